"""hqde_lightning: train an ensemble of your LightningModule as parallel Ray actors.

``Trainer(strategy=HQDEStrategy(num_members=4))`` is the whole change to existing code.

The names below are imported on first use (PEP 562 module ``__getattr__``), so importing a
maths module such as ``hqde_lightning.compression`` or ``hqde_lightning.aggregation`` loads
neither Ray nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hqde_lightning.aggregation import Aggregator
    from hqde_lightning.checkpoint import AtomicCheckpointIO
    from hqde_lightning.compat import HQDESystem, create_hqde_system
    from hqde_lightning.ensemble import Combiner, Ensemble
    from hqde_lightning.strategy import HQDEStrategy

__all__ = ["AtomicCheckpointIO", "Aggregator", "Combiner", "Ensemble", "HQDEStrategy", "HQDESystem", "create_hqde_system"]
__version__ = "0.1.0"

#: public name -> the submodule that defines it
_HOMES = {
    "Aggregator": "hqde_lightning.aggregation",
    "AtomicCheckpointIO": "hqde_lightning.checkpoint",
    "HQDESystem": "hqde_lightning.compat",
    "create_hqde_system": "hqde_lightning.compat",
    "Combiner": "hqde_lightning.ensemble",
    "Ensemble": "hqde_lightning.ensemble",
    "HQDEStrategy": "hqde_lightning.strategy",
}


def __getattr__(name: str) -> Any:
    """Imports a public name's submodule the first time the name is asked for, and caches the name."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
