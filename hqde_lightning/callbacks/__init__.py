"""Lightning callbacks for ``HQDEStrategy`` ensembles (each also works with a plain ``Trainer``).

* :class:`QuantumNoise`: annealed Gaussian exploration noise on weights or gradients.
* :class:`AdaptiveQuantization`: 4/8/16-bit weights at sync points, with error feedback.
* :class:`EnsembleSelection`: after ``fit``, keeps an accurate, diverse subset of members (QUBO).
* :class:`EnsembleCalibration`: after ``fit``, temperature-scales the ensemble on the validation data.
* :class:`ReliabilityDiagram`: in ``test``, draws the ensemble's reliability diagram (PNG, TensorBoard).
* :class:`OODEvaluation`: in ``test``, out-of-distribution detection AUROC/AUPR/FPR95 of the ensemble.
* :class:`PerformanceMonitor`: throughput and memory per member, traffic per sync.
* :class:`ByzantineMembers`: fault injection: chosen members send corrupted weights.
"""

from hqde_lightning.callbacks.byzantine import ByzantineMembers
from hqde_lightning.callbacks.calibration import EnsembleCalibration, ReliabilityDiagram
from hqde_lightning.callbacks.monitor import PerformanceMonitor
from hqde_lightning.callbacks.noise import QuantumNoise
from hqde_lightning.callbacks.ood import OODEvaluation
from hqde_lightning.callbacks.quantization import AdaptiveQuantization
from hqde_lightning.callbacks.selection import EnsembleSelection

__all__ = [
    "AdaptiveQuantization",
    "ByzantineMembers",
    "EnsembleCalibration",
    "EnsembleSelection",
    "OODEvaluation",
    "PerformanceMonitor",
    "QuantumNoise",
    "ReliabilityDiagram",
]
