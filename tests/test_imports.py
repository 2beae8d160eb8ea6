"""The maths modules import neither Ray nor Lightning; the package's public names still import; work on one device never imports Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
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
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
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
    assert "lightning" in loaded  # the strategy is a Lightning strategy
    assert [m for m in loaded if m.split(".")[0] == "ray"] == []  # Ray is imported only where actors start


def test_unknown_package_attribute_raises_attribute_error():
    import hqde_lightning

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hqde_lightning.Nope  # noqa: B018


#: one device, as a new user works on it: a fit as one member group, one under manual optimization (a group too), a fit in
#: member threads (a hook a group cannot run),
#: resuming it, test, predict, a checkpoint, the ensemble, and the original package's facade
ONE_DEVICE_SESSION = f"""
import os, sys, tempfile
sys.path.insert(0, {EXAMPLES!r})
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from digits_data import DigitsData, SimpleClassifier, digits
from hqde_lightning import HQDEStrategy, create_hqde_system

class Net(SimpleClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

class Manual(Net):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

class Threads(Manual):
    def on_validation_model_eval(self):
        super().on_validation_model_eval()

root = tempfile.mkdtemp()
data = DigitsData()
for module in (Net(), Manual(), Threads()):
    options = dict(default_root_dir=root, enable_progress_bar=False, logger=False, enable_model_summary=False)
    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2, seed=0), max_epochs=1, **options)
    trainer.fit(module, datamodule=data)
    path = os.path.join(root, "last.ckpt")
    trainer.save_checkpoint(path)
    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2, seed=0), max_epochs=2, **options)
    trainer.fit(module, datamodule=data, ckpt_path=path)
    assert trainer.current_epoch == 2
    (results,) = trainer.test(module, datamodule=data, verbose=False)
    assert results["ensemble/test_acc"] > 0.3
    trainer.predict(module, dataloaders=DataLoader(data.test.tensors[0], batch_size=128))
    trainer.strategy.ensemble.predict_with_uncertainty(data.test.tensors[0][:4])

class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def forward(self, x):
        return self.layer(x)

x, y = digits()
loader = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True)
with create_hqde_system(Flat, num_workers=2, enable_progress_bar=False) as system:
    system.train(loader, num_epochs=1)
    system.predict(DataLoader(x[256:300], batch_size=32))
"""


def test_training_and_evaluating_on_one_device_never_imports_ray():
    """Ray is imported only by fits that start Ray actors: importing it costs every other process about a second."""
    loaded = _loaded_after(textwrap.dedent(ONE_DEVICE_SESSION))
    assert [m for m in loaded if m.split(".")[0] == "ray"] == []
