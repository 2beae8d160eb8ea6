"""What members and the coordinator report to the driver while a fit runs, as small frozen records.

Members and the coordinator queue these at the coordinator (``Coordinator.emit``); the driver
drains the queue and hands each record to
:class:`~hqde_lightning.forwarder.EventForwarder`. :class:`SyncRecord` is also what
``HQDEStrategy.sync_history`` holds, one per completed sync round.

Plain dataclasses (no Ray, no Lightning): a field that is renamed or missing fails where the
record is built or read, not as a silently missing dictionary key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

__all__ = ["ClonesEvent", "DistanceEvent", "Event", "FinishedEvent", "HparamsEvent", "MetricsEvent", "Notice", "ProgressEvent", "SyncRecord", "sync_record"]


@dataclass(frozen=True)
class MetricsEvent:
    """Metrics member ``member`` logged to its stand-in for the user's logger number ``logger_index``.

    From a group actor, ``group`` lists the members it trains and the row is the group's: its
    keys already carry the ``member_{i}/`` prefixes (other keys, such as ``epoch``, are shown as
    the writer's).
    """

    member: int
    logger_index: int
    metrics: dict[str, float | int]
    step: int | None
    group: tuple[int, ...] | None = None


@dataclass(frozen=True)
class HparamsEvent:
    """Hyperparameters member 0 logged to its stand-in for the user's logger number ``logger_index``."""

    logger_index: int
    params: dict[str, Any]


@dataclass(frozen=True)
class ProgressEvent:
    """Member ``member`` is at batch ``batch`` of ``total`` (``None``: unknown) in epoch ``epoch``; ``loss`` is its latest training loss."""

    member: int
    epoch: int
    batch: int
    total: int | None
    loss: float | None


@dataclass(frozen=True)
class Notice:
    """A message for the user, shown once however many members send it: a warning, or information when ``warning`` is false."""

    member: int
    message: str
    warning: bool = True


@dataclass(frozen=True)
class DistanceEvent:
    """Member ``member``'s distance to the consensus it just applied, for the rows of logging step ``step``."""

    member: int
    step: int
    distance: float


@dataclass(frozen=True)
class FinishedEvent:
    """Member ``member``'s fit ended."""

    member: int


@dataclass(frozen=True)
class ClonesEvent:
    """Members ``members`` held identical weights after epoch ``round``."""

    members: list[int]
    round: int


@dataclass(frozen=True)
class SyncRecord:
    """One completed sync round, as the coordinator measured it.

    Attributes:
        round: the epoch whose end the round synced.
        members: the members whose weights took part (by index).
        excluded: those of ``members`` the aggregator left out (outliers, NaN/Inf).
        member_weights: each of ``members``' weight in the consensus.
        scores: each of ``members``' confidence score (``None`` where it had none).
        aggregation_seconds: time from the last payload's arrival to the consensus.
        topology: the topology's name.
        info: the aggregator's scalar diagnostics (e.g. ``reputation``).
        bytes_received: payload bytes the members sent.
        fp32_bytes: what the same tensors take as float32.
        comm_rounds: communication rounds the topology needed.
        bytes_moved: bytes moved between reducers, consensus included.
        sample_counts: samples each member trained on since its previous sync.
        step: the members' logging step at the sync (their end-of-epoch rows), where the driver
            logs the round; ``None`` when no member reported one.
    """

    round: int
    members: list[int]
    excluded: list[int]
    member_weights: list[float]
    scores: list[float | None]
    aggregation_seconds: float
    topology: str
    info: dict[str, Any] = field(default_factory=dict)
    bytes_received: int = 0
    fp32_bytes: int = 0
    comm_rounds: int = 0
    bytes_moved: int = 0
    sample_counts: list[int] = field(default_factory=list)
    step: int | None = None

    def __getitem__(self, name: str) -> Any:
        """``record["bytes_received"]`` reads the field of that name, as the dictionaries of earlier versions did."""
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        """The record as plain types (what checkpoints keep in the coordinator's history)."""
        return asdict(self)


#: everything that travels from the members and the coordinator to the driver
Event = Union[MetricsEvent, HparamsEvent, ProgressEvent, DistanceEvent, FinishedEvent, Notice, ClonesEvent, SyncRecord]


def sync_record(
    round_id: int, members: list[int], result: Any, seconds: float, entries: Sequence[tuple[Any, float | None, int, int, Mapping[str, int]]], comm: Any, step: int | None, topology: str
) -> SyncRecord:
    """What round ``round_id`` did: who took part with which weight, the aggregator's diagnostics, bytes and time.

    ``result`` is the topology's ``AggregationResult``, ``comm`` its ``CommStats``; ``entries``
    holds per member (payload, score, samples, payload bytes, layout).
    """
    return SyncRecord(
        round=round_id,
        members=members,
        excluded=[members[i] for i in result.excluded],
        member_weights=[float(w) for w in result.member_weights],
        scores=[e[1] for e in entries],
        aggregation_seconds=seconds,
        topology=topology,
        info={k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool, list))},
        bytes_received=sum(e[3] for e in entries),
        fp32_bytes=4 * sum(entries[0][4].values()) * len(entries),
        comm_rounds=comm.rounds,
        bytes_moved=comm.bytes_moved,
        sample_counts=[e[2] for e in entries],
        step=step,
    )
