"""hqde_lightning: train an ensemble of your LightningModule as parallel Ray actors.

``Trainer(strategy=HQDEStrategy(num_members=4))`` is the whole change to existing code.
"""

from hqde_lightning.aggregation import Aggregator
from hqde_lightning.checkpoint import AtomicCheckpointIO
from hqde_lightning.compat import HQDESystem, create_hqde_system
from hqde_lightning.ensemble import Combiner, Ensemble
from hqde_lightning.strategy import HQDEStrategy

__all__ = ["AtomicCheckpointIO", "Aggregator", "Combiner", "Ensemble", "HQDEStrategy", "HQDESystem", "create_hqde_system"]
__version__ = "0.1.0"
