"""The maths modules import neither Ray nor Lightning; the package's public names still import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATHS_MODULES = [
    "hqde_lightning.aggregation",
    "hqde_lightning.codec",
    "hqde_lightning.compression",
    "hqde_lightning.exploration",
    "hqde_lightning.placement",
    "hqde_lightning.selection",
    "hqde_lightning.topology",
]
FORBIDDEN = ("ray", "lightning", "lightning_fabric", "pytorch_lightning")


def _loaded_after(statement: str) -> list[str]:
    """Modules from :data:`FORBIDDEN` (or their submodules) loaded by ``statement`` in a fresh interpreter."""
    probe = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=300)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    return [m for m in modules if m.split(".")[0] in FORBIDDEN]


@pytest.mark.parametrize("module", MATHS_MODULES)
def test_maths_module_imports_no_ray_or_lightning(module):
    assert _loaded_after(f"import {module}") == []


def test_public_names_import_lazily_from_the_package():
    loaded = _loaded_after(
        "import hqde_lightning\n"
        "assert hqde_lightning.__file__.startswith(" + repr(ROOT) + ")\n"
        "from hqde_lightning import AtomicCheckpointIO, Aggregator, Combiner, Ensemble, HQDEStrategy, HQDESystem, create_hqde_system\n"
        "from lightning.pytorch.strategies import Strategy\n"
        "assert issubclass(HQDEStrategy, Strategy)\n"
        "import hqde_lightning as package\n"
        "assert sorted(package.__all__) == sorted(n for n in package.__all__ if hasattr(package, n))"
    )
    assert "ray" in loaded and "lightning" in loaded  # importing the strategy does load them


def test_unknown_package_attribute_raises_attribute_error():
    import hqde_lightning

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hqde_lightning.Nope  # noqa: B018
