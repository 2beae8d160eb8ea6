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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["NodeRecord", "PlacementScorer", "SCORE_WEIGHTS"]

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

    def record_speed(self, node_id: str, throughput: float) -> None:
        """Folds a member's measured throughput (batches/s) into the node's speed (mean of the last two)."""
        node = self.nodes.get(node_id)
        if node is not None and throughput > 0:
            node.speed = throughput if node.speed is None else 0.5 * (node.speed + throughput)
