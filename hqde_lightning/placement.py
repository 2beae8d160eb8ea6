"""Member placement: which Ray node a member starts (or restarts) on.

Each alive node gets a score in [0, 1]:

    0.4 · success rate + 0.3 · (1 − load) + 0.2 · speed + 0.1 · capability match

* success rate: (members finished + 1) / (finished + failed + 2) on that node (a Laplace
  estimate, 0.5 for a node never used);
* load: CPUs our members hold on the node / the node's CPUs (capped at 1);
* speed: the node's measured member throughput / the fastest node's (0.5 while unmeasured);
* capability match: 1 if the node has the CPUs and GPUs one member asks for, else 0.

The launcher starts each member on the best-scoring node (soft affinity: Ray may still place
it elsewhere if that node fills up) and counts the placement as load straight away, so members
spread over equal nodes.

Before any member starts, :func:`check_members_fit` packs the members' requests onto the
nodes' total resources (first fit, in member order; a fractional GPU request must fit within
one GPU, as Ray places it) and names the first member that fits nowhere. :func:`default_share`
is the largest equal share of a resource that packs ``n`` members onto the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hqde_lightning.validation import check_int

__all__ = [
    "NodeCapacity",
    "NodeRecord",
    "PlacementScorer",
    "SCORE_WEIGHTS",
    "check_members_fit",
    "default_share",
    "describe_resources",
    "fits_node",
    "ray_resources",
]

#: Ray accounts resources in steps of 1e-4; shares are rounded down to it so that n shares fit
_RESOURCE_STEP = 1e-4
_EPS = 1e-9

#: the weight of each criterion in a node's score
SCORE_WEIGHTS = {"success": 0.4, "load": 0.3, "speed": 0.2, "capability": 0.1}


@dataclass
class NodeRecord:
    """What placement knows about one node."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    successes: int = 0
    failures: int = 0
    cpus_used: float = 0.0
    speed: float | None = None

    @property
    def success_rate(self) -> float:
        return (self.successes + 1) / (self.successes + self.failures + 2)

    @property
    def load(self) -> float:
        return min(1.0, self.cpus_used / self.cpus) if self.cpus > 0 else 1.0


class PlacementScorer:
    """Ranks nodes for a member's resource request (see the module docstring for the score)."""

    def __init__(self, nodes: Sequence[NodeRecord]) -> None:
        if not nodes:
            raise ValueError("`nodes` must hold at least one node")
        self.nodes = {n.node_id: n for n in nodes}

    @classmethod
    def from_ray(cls) -> PlacementScorer:
        """Records for the alive nodes of the connected Ray cluster."""
        import ray

        nodes = [
            NodeRecord(n["NodeID"], float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
            for n in ray.nodes()
            if n.get("Alive")
        ]
        return cls(nodes)

    def score(self, node: NodeRecord, request: Mapping[str, float]) -> float:
        speeds = [n.speed for n in self.nodes.values() if n.speed]
        speed = node.speed / max(speeds) if node.speed and speeds else 0.5
        fits = node.cpus >= float(request.get("num_cpus", 0.0)) and node.gpus >= float(request.get("num_gpus", 0.0))
        w = SCORE_WEIGHTS
        return w["success"] * node.success_rate + w["load"] * (1.0 - node.load) + w["speed"] * speed + w["capability"] * float(fits)

    def rank(self, request: Mapping[str, float]) -> list[str]:
        """Node ids, best first (ties keep the cluster's order)."""
        order = list(self.nodes)
        return sorted(order, key=lambda node_id: -self.score(self.nodes[node_id], request))

    def place(self, request: Mapping[str, float]) -> str:
        """The best node for ``request``, counted as loaded by it from now on."""
        node_id = self.rank(request)[0]
        self.nodes[node_id].cpus_used += float(request.get("num_cpus", 0.0))
        return node_id

    def release(self, node_id: str, request: Mapping[str, float], succeeded: bool) -> None:
        """A member on ``node_id`` finished (``succeeded``) or died; its CPUs are free again."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.cpus_used = max(0.0, node.cpus_used - float(request.get("num_cpus", 0.0)))
        if succeeded:
            node.successes += 1
        else:
            node.failures += 1

    def remove(self, node_id: str) -> None:
        """Forgets a node that left the cluster, so no member is placed on it again."""
        if len(self.nodes) > 1:
            self.nodes.pop(node_id, None)

    def record_speed(self, node_id: str, throughput: float) -> None:
        """Folds a member's measured throughput (batches/s) into the node's speed (mean of the last two)."""
        node = self.nodes.get(node_id)
        if node is not None and throughput > 0:
            node.speed = throughput if node.speed is None else 0.5 * (node.speed + throughput)


@dataclass(frozen=True)
class NodeCapacity:
    """One node's total resources, under Ray's names (``CPU``, ``GPU``, ``memory``, custom ones)."""

    node_id: str
    resources: Mapping[str, float]
    address: str = ""


def ray_resources(request: Mapping[str, object]) -> dict[str, float]:
    """An actor request (``num_cpus``, ``num_gpus``, ``memory``, ``resources``) under Ray's resource names."""
    out: dict[str, float] = {}
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
        value = request.get(key)
        if value:
            out[name] = float(value)  # type: ignore[arg-type]
    custom = request.get("resources") or {}
    out.update({str(k): float(v) for k, v in custom.items() if v})  # type: ignore[union-attr]
    return out


def describe_resources(resources: Mapping[str, float]) -> str:
    """``resources`` as text (``2 CPU, 1 GPU, 4.0 GiB memory``), without Ray's internal node/object-store entries."""
    parts = []
    order = {"CPU": 0, "GPU": 1, "memory": 2}
    for name, value in sorted(resources.items(), key=lambda item: (order.get(item[0], 3), item[0])):
        if name.startswith("node:") or name == "object_store_memory" or name.startswith("accelerator_type"):
            continue
        parts.append(f"{value / 2**30:.1f} GiB memory" if name == "memory" else f"{value:g} {name}")
    return ", ".join(parts) or "nothing"


class _NodeRoom:
    """What is left on one node while members are packed onto it: GPUs are separate bins of 1."""

    def __init__(self, node: NodeCapacity) -> None:
        self.node = node
        self.free = {k: float(v) for k, v in node.resources.items() if k != "GPU"}
        self.gpus = [1.0] * int(math.floor(float(node.resources.get("GPU", 0.0)) + _EPS))

    def _gpu_slot(self, gpu: float) -> int | None:
        if gpu <= 0:
            return -1
        # best fit: the fullest GPU that still has room, so fractions pack as Ray packs them
        candidates = [i for i, free in enumerate(self.gpus) if free + _EPS >= gpu]
        return min(candidates, key=lambda i: self.gpus[i]) if candidates else None

    def fits(self, request: Mapping[str, float]) -> bool:
        if any(self.free.get(k, 0.0) + _EPS < v for k, v in request.items() if k != "GPU"):
            return False
        return self._gpu_slot(request.get("GPU", 0.0)) is not None

    def take(self, request: Mapping[str, float]) -> None:
        for k, v in request.items():
            if k != "GPU":
                self.free[k] = self.free.get(k, 0.0) - v
        slot = self._gpu_slot(request.get("GPU", 0.0))
        if slot is not None and slot >= 0:
            self.gpus[slot] -= request["GPU"]


def fits_node(request: Mapping[str, float], node: NodeCapacity) -> bool:
    """Whether one member's request (Ray resource names) fits on the empty ``node``."""
    return _NodeRoom(node).fits(request)


def check_members_fit(requests: Sequence[Mapping[str, float]], nodes: Sequence[NodeCapacity]) -> None:
    """Raises ``ValueError`` naming the first member whose request cannot be packed onto ``nodes``.

    Requests use Ray's resource names (see :func:`ray_resources`); members are packed in order,
    each onto the first node with room left (a fractional GPU must fit within one GPU).
    """
    rooms = [_NodeRoom(node) for node in nodes]
    for index, request in enumerate(requests):
        room = next((r for r in rooms if r.fits(request)), None)
        if room is None:
            offer = "; ".join(f"node {n.node_id[:8]}{f' ({n.address})' if n.address else ''}: {describe_resources(n.resources)}" for n in nodes)
            alone = any(fits_node(request, n) for n in nodes)
            reason = f"members 0..{index - 1} already fill the nodes" if alone else "no node is that large"
            raise ValueError(
                f"member {index} of {len(requests)} asks for {describe_resources(request)} and cannot be placed ({reason});"
                f" the cluster's nodes offer: {offer or 'no alive node'}"
            )
        room.take(request)


def default_share(capacities: Sequence[float], num_members: int) -> float:
    """The largest equal share s of a resource such that ``num_members`` shares pack onto nodes
    holding ``capacities`` (sum over nodes of floor(c / s) >= n), rounded down to Ray's 1e-4 step.

    One node of 2 CPUs and 3 members: 0.6666; nodes of 4 and 1 CPUs and 2 members: 2 (both on the
    first node), where the cluster-wide mean (2.5) would fit only one member. 0 when nothing has any.
    """
    num_members = check_int(num_members, "num_members", 1)
    best = 0.0
    for capacity in capacities:
        for per_node in range(1, num_members + 1):
            share = round(math.floor(capacity / per_node / _RESOURCE_STEP + _EPS) * _RESOURCE_STEP, 4)
            if share > best and sum(math.floor(c / share + _EPS) for c in capacities) >= num_members:
                best = share
    return best
