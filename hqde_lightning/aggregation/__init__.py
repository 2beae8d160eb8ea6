"""Aggregation rules: member state dicts in, a consensus out (plain torch)."""

from __future__ import annotations

from hqde_lightning.aggregation.base import AggregationResult, Aggregator, StateDict
from hqde_lightning.aggregation.entanglement import Entanglement
from hqde_lightning.aggregation.geometric_median import GeometricMedian
from hqde_lightning.aggregation.krum import Krum, MultiKrum, krum_ranking, krum_scores
from hqde_lightning.aggregation.mean import Mean
from hqde_lightning.aggregation.robust import Reputation, RobustAggregator, coordinate_median, mad_outliers
from hqde_lightning.aggregation.superposition import Superposition, superposition_weights
from hqde_lightning.aggregation.trimmed_mean import TrimmedMean
from hqde_lightning.validation import registry, resolve

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "Entanglement",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MultiKrum",
    "Reputation",
    "RobustAggregator",
    "StateDict",
    "Superposition",
    "TrimmedMean",
    "coordinate_median",
    "krum_ranking",
    "krum_scores",
    "mad_outliers",
    "resolve_aggregator",
    "superposition_weights",
]

#: name accepted by ``HQDEStrategy(aggregator=...)`` -> class constructed with defaults
AGGREGATORS: dict[str, type[Aggregator]] = registry(Mean, Superposition, Entanglement, GeometricMedian, TrimmedMean, Krum, MultiKrum)


def resolve_aggregator(aggregator: str | Aggregator) -> Aggregator:
    """Returns an :class:`Aggregator` for a registered name or an instance.

    Raises:
        ValueError: for an unknown name, listing the allowed ones.
        TypeError: for anything that is neither a name nor an ``Aggregator``.
    """
    return resolve(aggregator, "aggregator", Aggregator, AGGREGATORS)
