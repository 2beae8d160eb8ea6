"""Topologies: flat, tree and map-reduce reach the same mean; rounds and bytes are counted."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import DigitsDataModule, DigitsModule
from torch import nn

from hqde_lightning import HQDEStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from hqde_lightning.aggregation import GeometricMedian, Krum, Mean, MultiKrum, TrimmedMean, resolve_aggregator
from hqde_lightning.codec import payload_layout, payload_nbytes
from hqde_lightning.topology import Flat, LocalExecutor, MapReduce, Tree, resolve_topology


def _payloads(n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10), nn.Embedding(5, 3))
        model[1].running_mean.uniform_()
        out.append({k: v.numpy().copy() for k, v in model.state_dict().items() if torch.is_floating_point(v)})
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("topology", [Tree(), MapReduce(num_reducers=3)])
def test_same_mean_as_flat(topology, n):
    payloads = _payloads(n)
    sizes = [payload_nbytes(p) for p in payloads]
    weights = [float(i + 1) for i in range(n)]  # unequal sample counts
    layout = payload_layout(payloads[0])
    flat, _ = Flat().reduce(payloads, sizes, Mean(), None, weights, LocalExecutor(), layout)
    other, comm = topology.reduce(payloads, sizes, Mean(), None, weights, LocalExecutor(), layout)
    for key in flat.state:
        torch.testing.assert_close(other.state[key], flat.state[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.member_weights, flat.member_weights, rtol=1e-6, atol=1e-9)
    if isinstance(topology, Tree):
        assert comm.rounds == int(np.ceil(np.log2(n))) if n > 1 else comm.rounds == 0
        assert comm.tasks == n - 1
    else:
        assert comm.rounds == 2 and comm.tasks == min(3, len(layout))
    assert comm.bytes_moved >= (sum(sizes) if n > 1 else 0)


def test_mapreduce_shards_are_balanced():
    shards = MapReduce(num_reducers=2).shards({"a": 100, "b": 60, "c": 50, "d": 5})
    loads = sorted(sum({"a": 100, "b": 60, "c": 50, "d": 5}[k] for k in s) for s in shards)
    assert loads == [105, 110]  # largest first, each to the lightest shard


@pytest.mark.parametrize("topology", [Flat(), Tree(), MapReduce(num_reducers=2)])
def test_nan_member_never_reaches_consensus(topology):
    payloads = _payloads(4)
    payloads[2] = {k: np.full_like(v, np.nan) for k, v in payloads[2].items()}
    sizes = [payload_nbytes(p) for p in payloads]
    rule = Mean() if isinstance(topology, Tree) else GeometricMedian()
    result, _ = topology.reduce(payloads, sizes, rule, None, [1.0] * 4, LocalExecutor(), payload_layout(payloads[0]))
    assert all(torch.isfinite(v).all() for v in result.state.values())
    assert 2 in result.excluded


def _distance(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return float(sum((state[k].double() - reference[k].double()).pow(2).sum() for k in reference) ** 0.5)


ROBUST_RULES = {
    "geometric_median": GeometricMedian,
    "trimmed_mean": lambda: TrimmedMean(beta=0.3),
    "krum": lambda: Krum(num_byzantine=2),
    "multi_krum": lambda: MultiKrum(num_byzantine=2),
}


@pytest.mark.parametrize("rule_name", sorted(ROBUST_RULES))
@pytest.mark.parametrize("topology", [Flat(), Tree(), MapReduce(num_reducers=3)])
def test_robust_rules_keep_their_guarantee_on_every_topology(topology, rule_name):
    """2 of 7 members send -100x weights: a robust rule stays among the honest members, or the topology refuses it."""
    rule = ROBUST_RULES[rule_name]()
    payloads = _payloads(7)
    honest = [{k: torch.tensor(v) for k, v in p.items()} for p in payloads[2:]]
    for bad in (0, 1):
        payloads[bad] = {k: -100.0 * v for k, v in payloads[bad].items()}
    sizes = [payload_nbytes(p) for p in payloads]
    layout = payload_layout(payloads[0])
    clean = Mean()(honest).state
    spread = max(_distance(h, clean) for h in honest)
    if isinstance(topology, Tree):
        with pytest.raises(ValueError, match=rf"topology='tree'.*{type(rule).__name__}.*topology='flat'.*topology='mapreduce'"):
            topology.check(rule)
        with pytest.raises(ValueError, match="topology='tree'"):
            topology.reduce(payloads, sizes, rule, None, [1.0] * 7, LocalExecutor(), layout)
        with pytest.raises(MisconfigurationException, match="topology='tree'"):
            HQDEStrategy(num_members=7, aggregator=rule, topology="tree")
        return
    result, _ = topology.reduce(payloads, sizes, rule, None, [1.0] * 7, LocalExecutor(), layout)
    assert _distance(result.state, clean) < spread
    plain, _ = topology.reduce(payloads, sizes, Mean(), None, [1.0] * 7, LocalExecutor(), layout)
    assert _distance(plain.state, clean) > 10 * spread  # the attack is strong enough to matter


def test_tree_pair_with_an_excluded_member_weighs_by_its_survivors():
    payloads = _payloads(4)
    payloads[1] = {k: np.full_like(v, np.nan) for k, v in payloads[1].items()}
    sizes = [payload_nbytes(p) for p in payloads]
    result, _ = Tree().reduce(payloads, sizes, Mean(), None, [1.0] * 4, LocalExecutor(), payload_layout(payloads[0]))
    torch.testing.assert_close(result.member_weights, torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3], dtype=torch.float64))
    expected = Mean()([{k: torch.tensor(v) for k, v in payloads[i].items()} for i in (0, 2, 3)]).state
    assert _distance(result.state, expected) < 1e-4
    assert result.excluded == [1]


def test_tree_pair_of_two_nan_members_does_not_raise():
    payloads = _payloads(4)
    for bad in (0, 1):
        payloads[bad] = {k: np.full_like(v, np.nan) for k, v in payloads[bad].items()}
    sizes = [payload_nbytes(p) for p in payloads]
    result, _ = Tree().reduce(payloads, sizes, Mean(), None, [1.0] * 4, LocalExecutor(), payload_layout(payloads[0]))
    torch.testing.assert_close(result.member_weights, torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64))
    assert result.excluded == [0, 1]
    assert all(torch.isfinite(v).all() for v in result.state.values())
    everything = [{k: np.full_like(v, np.nan) for k, v in p.items()} for p in payloads]
    with pytest.raises(ValueError, match="every member state holds NaN"):
        Tree().reduce(everything, sizes, Mean(), None, [1.0] * 4, LocalExecutor(), payload_layout(payloads[0]))


@pytest.mark.parametrize("rule", [Mean(), GeometricMedian()])
def test_mapreduce_excludes_a_member_from_every_shard(rule):
    """A member with NaN in one tensor only is left out of all shards, as the flat topology does."""
    payloads = _payloads(4)
    key = next(iter(payloads[3]))
    payloads[3][key] = np.full_like(payloads[3][key], np.nan)
    sizes = [payload_nbytes(p) for p in payloads]
    layout = payload_layout(payloads[0])
    flat, _ = Flat().reduce(payloads, sizes, rule, None, [1.0] * 4, LocalExecutor(), layout)
    sharded, comm = MapReduce(num_reducers=3).reduce(payloads, sizes, rule, None, [1.0] * 4, LocalExecutor(), layout)
    assert sharded.excluded == flat.excluded == [3]
    assert float(sharded.member_weights[3]) == 0.0
    assert comm.rounds == 3
    if isinstance(rule, Mean):
        for k in flat.state:
            torch.testing.assert_close(sharded.state[k], flat.state[k], rtol=1e-5, atol=1e-6)


def test_unknown_topology_named():
    with pytest.raises(ValueError, match="topology='ring'"):
        resolve_topology("ring")


def _fit(topology: str, tmp_path) -> HQDEStrategy:
    strategy = HQDEStrategy(num_members=3, sync="replace", topology=topology, seed=5)
    trainer = pl.Trainer(strategy=strategy, max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, deterministic=True)
    pl.seed_everything(0, verbose=False)  # the same initial weights in every fit
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    return strategy


def test_topologies_agree_in_a_real_fit(ray_session, tmp_path):
    fits = {name: _fit(name, tmp_path / name) for name in ("flat", "tree", "mapreduce")}
    reference = fits["flat"].ensemble.members[0].state_dict()
    for name in ("tree", "mapreduce"):
        member = fits[name].ensemble.members[0].state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(member[key], value, rtol=1e-4, atol=1e-5)
        (sync,) = fits[name].sync_history
        assert sync["topology"] == name and sync["comm_rounds"] == 2 and sync["bytes_moved"] > sync["bytes_received"]
    assert fits["flat"].sync_history[0]["comm_rounds"] == 1


def test_the_tree_refuses_entanglement_which_a_pair_would_make_a_plain_mean():
    """Both members of a pair agree with each other equally: every pair weighed 0.5/0.5, and a tree of entanglement
    gave the plain mean (0.06 from flat's consensus with one member moving away from three)."""
    with pytest.raises(ValueError, match=r"entanglement weighs each member by its agreement with all the others"):
        Tree().check(resolve_aggregator("entanglement"))
    with pytest.raises(MisconfigurationException, match=r"topology='tree'.*entanglement"):
        HQDEStrategy(num_members=3, aggregator="entanglement", topology="tree")
