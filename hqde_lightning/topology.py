"""Topologies: the path member weights take to become the consensus.

* ``flat``: every member's weights go to one process, which runs the aggregator once.
* ``tree``: pairwise reduction in ceil(log2 n) rounds; each round's pairs are combined in
  parallel tasks and only the partial results move on. Exact for the mean and for
  superposition, for any number of members: a pair's result carries the total weight ``W`` of
  the pair's members that took part, so the weighted mean of partial means is the mean, and
  the score ``rule.partial_score`` gives it — for superposition the log-mean-exp
  ``S = T log(sum_i w_i exp(c_i / T) / W)``, so that ``W exp(S / T)`` is the sum of its members'
  ``w_i exp(c_i / T)`` and every member ends with the weight it gets on ``flat``.
  Entanglement is refused: it weighs each member by its agreement with all the others, which
  a pair cannot see (its two members agree equally, so every pair would be a plain mean). Robust rules (``Aggregator.robust``: geometric median,
  trimmed mean, Krum, Multi-Krum, the outlier filter) are refused: a pair holding one bad
  member has no honest majority, so a median of pairwise medians has no breakdown guarantee
  (2 of 7 members sending -100x weights move it as far as the plain mean).
* ``mapreduce``: parameters are sharded by name across R reducers (balanced by size); each
  reducer aggregates its shard of every member in parallel and the shards are gathered. Exact
  for coordinate-wise rules (mean, trimmed mean); whole-vector rules (geometric median, Krum,
  entanglement) see one shard at a time, which is a different estimator but keeps the rule's
  breakdown guarantee in every shard (the bad members are a minority of every shard).
  Entanglement keeps one reference per shard (the shard's previous consensus), see below.

"Excluded" means the same on every topology: a member with a NaN/Inf value anywhere is left
out of the whole consensus (every shard of ``mapreduce``) and carries no weight, also in a
``tree`` pair; a pair whose members are all excluded passes nothing on.

Payloads are decoded by :mod:`hqde_lightning.codec`, and every aggregation rule is applied
through :func:`aggregate`, once per reduction task. ``flat`` applies the caller's rule itself, in
the calling process, so a rule that keeps per-member state (reputations) advances once per round;
``tree`` gives each task a copy of the rule (a partial input must not advance it), and ``mapreduce``
gives each shard's task a copy of ``rule.shard_rule(shard)``: a new copy of the rule for most
rules, and for entanglement the shard's own instance, kept inside the rule (and its
``state_dict``, so checkpoints keep it), into which the state the task ended with is loaded
back, so each shard's reference is that shard's previous consensus.

Work runs through an :class:`Executor`: :class:`LocalExecutor` runs tasks in this process (unit
tests, small models); the coordinator uses ``hqde_lightning.actors.RayExecutor``, which runs them
as Ray tasks that read member payloads straight from the object store. Each reduction reports the
communication rounds it took and the bytes it moved (payload bytes into each task plus the results
out).

Plain numpy/torch only: no Ray, no Lightning.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hqde_lightning.aggregation import AggregationResult, Aggregator, StateDict
from hqde_lightning.codec import decode_payload, state_to_numpy
from hqde_lightning.validation import check_int, registry, resolve

__all__ = [
    "TOPOLOGIES",
    "CommStats",
    "Executor",
    "Flat",
    "LocalExecutor",
    "MapReduce",
    "Topology",
    "Tree",
    "aggregate",
    "combine_group",
    "resolve_topology",
]


def aggregate(
    rule: Aggregator,
    states: Sequence[StateDict],
    scores: Sequence[float | None] | None = None,
    weights: Sequence[float] | None = None,
    members: Sequence[int] | None = None,
) -> AggregationResult:
    """Applies ``rule`` to decoded member ``states``: the one place an aggregation rule is called.

    Args:
        rule: the aggregation rule (called as it is: a stateful rule's state advances).
        states: one state dict per member taking part.
        scores: per-member confidence; when any is ``None`` the rule gets no scores at all.
        weights: per-member sample counts (the rule's prior), or ``None`` for equal weights.
        members: each state's member index, for rules that keep per-member state.
    """
    usable = None if scores is None or any(s is None for s in scores) else [float(s) for s in scores]
    return rule(states, scores=usable, sample_counts=weights, members=members)


def _is_finite(state: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_floating_point(v) or torch.is_complex(v))


def combine_group(
    rule: Aggregator,
    payloads: Sequence[Any],
    scores: Sequence[float] | None,
    weights: Sequence[float],
    keys: Sequence[str] | None = None,
    members: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray] | None, list[float], list[int], dict[str, Any], list[int], dict[str, Any]]:
    """One reduction task: decodes ``payloads`` (values, their ``keys`` only) and applies ``rule`` with :func:`aggregate`.

    Returns the consensus as numpy arrays, the weight each input received, the excluded
    inputs, the rule's info, the inputs holding NaN/Inf values and ``rule.state_dict()`` after
    the task (a task may run in another process, where what it does to ``rule`` stays). When
    every input holds NaN/Inf the consensus is ``None``, every weight is zero and ``rule`` is
    not called.
    """
    states = [decode_payload(p, keys) for p in payloads]
    non_finite = [i for i, state in enumerate(states) if not _is_finite(state)]
    if len(non_finite) == len(states):
        return None, [0.0] * len(states), non_finite, {}, non_finite, rule.state_dict()
    result = aggregate(rule, states, scores, weights, members)
    return (
        state_to_numpy(result.state),
        [float(w) for w in result.member_weights],
        result.excluded,
        result.info,
        non_finite,
        rule.state_dict(),
    )


@dataclass
class CommStats:
    """What one reduction cost in communication."""

    rounds: int
    bytes_moved: int
    tasks: int


class Executor(ABC):
    """Runs reduction tasks; ``submit`` returns a handle that ``gather`` resolves.

    Payloads may be handles (e.g. object-store references) that tasks resolve themselves;
    :meth:`fetch` gives their values to code that runs in the calling process.
    """

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    @abstractmethod
    def gather(self, handles: Sequence[Any]) -> list[Any]: ...

    @abstractmethod
    def fetch(self, payloads: Sequence[Any]) -> list[Any]:
        """The values of ``payloads`` (handles resolved, values unchanged), in order."""


class LocalExecutor(Executor):
    """Runs each task immediately in this process; payloads are values."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)

    def fetch(self, payloads: Sequence[Any]) -> list[Any]:
        return list(payloads)


class Topology(ABC):
    """A way to reduce member payloads with an aggregation rule."""

    name: str = ""

    def check(self, rule: Aggregator) -> None:
        """Raises ``ValueError`` when ``rule`` cannot run on this topology."""

    @abstractmethod
    def reduce(
        self,
        payloads: Sequence[Any],
        sizes: Sequence[int],
        rule: Aggregator,
        scores: Sequence[float] | None,
        weights: Sequence[float],
        executor: Executor,
        layout: Mapping[str, int],
        members: Sequence[int] | None = None,
    ) -> tuple[AggregationResult, CommStats]:
        """Combines ``payloads`` (values or ``executor`` handles) of ``sizes`` bytes each.

        ``layout`` maps every floating-point entry's name to its number of values. ``members``
        (each payload's member index) reaches the rule where it is applied to whole rounds
        (``flat``); ``tree`` and ``mapreduce`` apply copies of it (of its per-shard instances,
        ``rule.shard_rule``, on ``mapreduce``) to partial inputs.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _nbytes(value: Any) -> int:
    """Bytes of the tensors and arrays in ``value`` (nested dicts, lists and tuples)."""
    if isinstance(value, (Tensor, np.ndarray)):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _result(state: Mapping[str, np.ndarray], weights: Sequence[float], excluded: Sequence[int], info: dict[str, Any]) -> AggregationResult:
    tensor_state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    return AggregationResult(tensor_state, torch.tensor(list(weights), dtype=torch.float64), sorted(set(excluded)), info)


class Flat(Topology):
    """Every member's weights to one process; one aggregation."""

    name = "flat"

    def reduce(self, payloads, sizes, rule, scores, weights, executor, layout, members=None):
        state, member_weights, excluded, info, _, _ = combine_group(rule, executor.fetch(payloads), scores, list(weights), members=members)
        if state is None:
            raise ValueError("every member state holds NaN or Inf values; there is nothing to aggregate")
        consensus_bytes = sum(v.nbytes for v in state.values())
        return _result(state, member_weights, excluded, info), CommStats(1, sum(sizes) + consensus_bytes, 1)


@dataclass
class _Node:
    """A tree node: a member payload or a partial result, with what it stands for."""

    payload: Any
    weight: float  # total weight of the members that took part below this node
    score: float | None
    members: list[int]
    nbytes: int


def _combined_score(rule: Aggregator, sides: Sequence[_Node]) -> float | None:
    """The score the partial result of ``sides`` carries on: ``rule.partial_score`` (``None`` without scores).

    For superposition it is the log-mean-exp of the sides' scores, so that the partial result,
    with the total weight of ``sides``, weighs exactly as much as its members together.
    """
    if any(side.score is None for side in sides):
        return None
    return rule.partial_score([side.score for side in sides], [side.weight for side in sides])


class Tree(Topology):
    """Pairwise reduction in ceil(log2 n) parallel rounds (mean-like rules only, see the module docstring)."""

    name = "tree"

    def check(self, rule: Aggregator) -> None:
        if rule.robust:
            raise ValueError(
                f"`topology='tree'` with `aggregator={rule!r}`: the tree combines members two at a time, and a pair holding"
                " one bad member has no honest majority, so a robust rule loses its breakdown guarantee there. Use"
                " `topology='flat'` or `topology='mapreduce'` with this aggregator, or a mean-like aggregator"
                " ('mean', 'superposition') on the tree."
            )
        if rule.name == "entanglement":
            raise ValueError(
                f"`topology='tree'` with `aggregator={rule!r}`: entanglement weighs each member by its agreement with all the"
                " others, which a pair cannot see (two members agree with each other equally, so every pair would be a plain"
                " mean). Use `topology='flat'` or `topology='mapreduce'` with it, or 'mean'/'superposition' on the tree."
            )

    def reduce(self, payloads, sizes, rule, scores, weights, executor, layout, members=None):
        self.check(rule)
        n = len(payloads)
        nodes = [_Node(payloads[i], float(weights[i]), None if scores is None else float(scores[i]), [i], int(sizes[i])) for i in range(n)]
        member_weight = {i: 1.0 for i in range(n)}
        excluded: set[int] = set()
        rounds = bytes_moved = tasks = 0
        info: dict[str, Any] = {}
        while len(nodes) > 1:
            rounds += 1
            pairs = [nodes[i : i + 2] for i in range(0, len(nodes), 2)]
            handles = []
            for pair in pairs:
                if len(pair) == 1:
                    handles.append(None)
                    continue
                pair_scores = None if scores is None else [pair[0].score, pair[1].score]
                handles.append(executor.submit(combine_group, copy.deepcopy(rule), [pair[0].payload, pair[1].payload], pair_scores, [pair[0].weight, pair[1].weight]))
                bytes_moved += pair[0].nbytes + pair[1].nbytes
                tasks += 1
            resolved = executor.gather([h for h in handles if h is not None])
            next_nodes = []
            for pair, handle in zip(pairs, handles):
                if handle is None:
                    next_nodes.append(pair[0])
                    continue
                state, pair_weights, pair_excluded, pair_info, _, _ = resolved.pop(0)
                for side, w in zip(pair, pair_weights):
                    for member in side.members:
                        member_weight[member] *= w
                for side_index in pair_excluded:
                    excluded.update(pair[side_index].members)
                if state is None:  # both sides excluded: nothing moves on
                    continue
                info = pair_info
                kept = [side for index, side in enumerate(pair) if index not in pair_excluded]
                size = sum(v.nbytes for v in state.values())
                bytes_moved += size
                next_nodes.append(_Node(state, sum(side.weight for side in kept), _combined_score(rule, kept), pair[0].members + pair[1].members, size))
            nodes = next_nodes
        if not nodes:
            raise ValueError("every member state holds NaN or Inf values; there is nothing to aggregate")
        state = state_to_numpy(decode_payload(executor.fetch([nodes[0].payload])[0]))
        weights_out = [member_weight[i] for i in range(n)]
        return _result(state, weights_out, excluded, info), CommStats(rounds, bytes_moved, tasks)


class MapReduce(Topology):
    """Parameters sharded by name across ``num_reducers`` parallel reducers, then gathered.

    Args:
        num_reducers: number of shards (at most one per parameter tensor).
    """

    name = "mapreduce"

    def __init__(self, num_reducers: int = 4) -> None:
        self.num_reducers = check_int(num_reducers, "num_reducers", 1)

    def shards(self, sizes_by_key: Mapping[str, int]) -> list[list[str]]:
        """Greedy balanced partition of the keys: largest tensors first, each to the lightest shard."""
        count = max(1, min(self.num_reducers, len(sizes_by_key)))
        loads = [0] * count
        shards: list[list[str]] = [[] for _ in range(count)]
        for key in sorted(sizes_by_key, key=lambda k: -sizes_by_key[k]):
            target = loads.index(min(loads))
            shards[target].append(key)
            loads[target] += sizes_by_key[key]
        return [s for s in shards if s]

    def reduce(self, payloads, sizes, rule, scores, weights, executor, layout, members=None):
        keys_sizes = dict(layout)
        shards = self.shards(keys_sizes)
        shard_rules = [rule.shard_rule(",".join(shard)) for shard in shards]
        handles = [
            executor.submit(combine_group, copy.deepcopy(shard_rule), list(payloads), scores, list(weights), shard)
            for shard_rule, shard in zip(shard_rules, shards)
        ]
        outputs = executor.gather(handles)
        total = sum(keys_sizes.values()) or 1
        rounds, tasks, bytes_in = 2, len(shards), sum(sizes)
        state_bytes = sum(_nbytes(out[5]) for out in outputs)  # the shard rules' state coming back
        non_finite = sorted({i for out in outputs for i in out[4]})
        if len(non_finite) == len(payloads):
            raise ValueError("every member state holds NaN or Inf values; there is nothing to aggregate")
        redo = [j for j, out in enumerate(outputs) if sorted(out[4]) != non_finite]
        if redo:  # a member non-finite in some shard is left out of every shard
            keep = [i for i in range(len(payloads)) if i not in non_finite]
            sub_scores = None if scores is None else [scores[i] for i in keep]
            sub_weights = [weights[i] for i in keep]
            redone = executor.gather(
                [executor.submit(combine_group, copy.deepcopy(shard_rules[j]), [payloads[i] for i in keep], sub_scores, sub_weights, shards[j]) for j in redo]
            )
            state_bytes += sum(_nbytes(out[5]) for out in redone)
            for j, (shard_state, shard_weights, shard_excluded, shard_info, _, rule_state) in zip(redo, redone):
                full_weights = np.zeros(len(payloads))
                full_weights[keep] = shard_weights
                outputs[j] = (shard_state, full_weights.tolist(), [keep[e] for e in shard_excluded] + non_finite, shard_info, non_finite, rule_state)
            rounds, tasks = rounds + 1, tasks + len(redo)
            bytes_in += sum(sizes[i] for i in keep) * sum(keys_sizes[k] for j in redo for k in shards[j]) // total
        state: dict[str, np.ndarray] = {}
        member_weights = np.zeros(len(payloads))
        excluded: set[int] = set()
        for shard, shard_rule, (shard_state, shard_weights, shard_excluded, _, _, rule_state) in zip(shards, shard_rules, outputs):
            shard_rule.load_state_dict(rule_state)  # the state the shard's task left its copy in
            state.update(shard_state)
            member_weights += np.asarray(shard_weights) * sum(keys_sizes[k] for k in shard) / total
            excluded.update(shard_excluded)
        consensus_bytes = sum(v.nbytes for v in state.values())
        stats = CommStats(rounds, bytes_in + consensus_bytes + state_bytes, tasks)
        return _result(state, member_weights.tolist(), excluded, {"shards": len(shards)}), stats

    def __repr__(self) -> str:
        return f"MapReduce(num_reducers={self.num_reducers})"


TOPOLOGIES: dict[str, type[Topology]] = registry(Flat, Tree, MapReduce)


def resolve_topology(topology: str | Topology) -> Topology:
    """A :class:`Topology` for a registered name or an instance (``ValueError`` lists the names)."""
    return resolve(topology, "topology", Topology, TOPOLOGIES)
