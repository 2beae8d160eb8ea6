"""Topologies: flat, tree and map-reduce reach the same mean; rounds and bytes are counted."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import DigitsDataModule, DigitsModule
from torch import nn

from hqde_lightning import HQDEStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from hqde_lightning.aggregation import Entanglement, GeometricMedian, Krum, Mean, MultiKrum, Superposition, TrimmedMean, resolve_aggregator
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


def _vector(state, keys) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 8, 9, 16])
def test_tree_superposition_is_exact_for_any_number_of_members(n, temperature):
    """Each partial result carries the log-mean-exp of its members' scores: the tree gives flat's weights and consensus.

    It used to carry the weighted average score, which is not exact even for powers of two
    (4 members holding 0, 1, 2, 3 with scores 0, 0, 0, 3: flat 2.7401, tree 2.5052).
    """
    generator = np.random.default_rng(100 * n + int(10 * temperature))
    payloads = [{"w": generator.normal(size=(3, 4)), "b": generator.normal(size=5)} for _ in range(n)]
    sizes = [payload_nbytes(p) for p in payloads]
    layout = payload_layout(payloads[0])
    scores = list(generator.normal(size=n) * 2)
    counts = list(generator.integers(1, 20, size=n).astype(float))
    rule = Superposition(temperature=temperature)
    flat, _ = Flat().reduce(payloads, sizes, rule, scores, counts, LocalExecutor(), layout)
    tree, _ = Tree().reduce(payloads, sizes, rule, scores, counts, LocalExecutor(), layout)
    np.testing.assert_allclose(tree.member_weights.numpy(), flat.member_weights.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(_vector(tree.state, layout), _vector(flat.state, layout), rtol=0, atol=1e-6)
    logits = np.asarray(scores) / temperature + np.log(counts)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(tree.member_weights.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_tree_superposition_reported_case_and_edge_scores():
    values = [{"w": np.array([float(i)])} for i in range(4)]
    sizes = [payload_nbytes(p) for p in values]
    flat, _ = Flat().reduce(values, sizes, Superposition(), [0.0, 0.0, 0.0, 3.0], [1.0] * 4, LocalExecutor(), {"w": 1})
    tree, _ = Tree().reduce(values, sizes, Superposition(), [0.0, 0.0, 0.0, 3.0], [1.0] * 4, LocalExecutor(), {"w": 1})
    expected = np.exp([0.0, 0.0, 0.0, 3.0]) @ np.arange(4) / np.exp([0.0, 0.0, 0.0, 3.0]).sum()  # 2.7401
    assert abs(float(tree.state["w"][0]) - expected) < 1e-12 and abs(float(flat.state["w"][0]) - expected) < 1e-12
    torch.testing.assert_close(tree.member_weights, flat.member_weights, rtol=0, atol=1e-12)
    # non-finite scores (weight zero), a member with NaN values (excluded) and a temperature whose c / T overflows
    payloads = _payloads(7)
    key = next(iter(payloads[4]))
    payloads[4][key] = np.full_like(payloads[4][key], np.nan)
    sizes = [payload_nbytes(p) for p in payloads]
    layout = payload_layout(payloads[0])
    scores = [0.5, float("nan"), 1.0, float("-inf"), 2.0, -0.3, 1.7]
    counts = [3.0, 1.0, 2.0, 5.0, 1.0, 4.0, 2.0]
    for rule in (Superposition(temperature=0.7), Superposition(temperature=1e-310)):
        flat, _ = Flat().reduce(payloads, sizes, rule, scores, counts, LocalExecutor(), layout)
        tree, _ = Tree().reduce(payloads, sizes, rule, scores, counts, LocalExecutor(), layout)
        assert tree.excluded == flat.excluded == [4]
        np.testing.assert_allclose(tree.member_weights.numpy(), flat.member_weights.numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(_vector(tree.state, layout), _vector(flat.state, layout), rtol=0, atol=1e-6)
    assert tree.member_weights.tolist() == [0.0] * 6 + [1.0]  # T -> 0: the best member left (6; 4 is excluded)


def _entangled(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Entanglement by hand (strength 1, equal counts): softmax of the row sums of the update cosines."""
    updates = rows - reference
    unit = updates / np.linalg.norm(updates, axis=1, keepdims=True)
    cosines = unit @ unit.T
    agreement = cosines.sum(axis=1) - np.diag(cosines)
    weights = np.exp(agreement - agreement.max())
    return (weights / weights.sum()) @ rows


class _CopyingExecutor(LocalExecutor):
    """Runs each task on copies of its arguments, as a Ray task would: what it does to the rule stays there."""

    def submit(self, fn, *args):
        return fn(*copy.deepcopy(args))


@pytest.mark.parametrize("executor", [LocalExecutor(), _CopyingExecutor()], ids=["local", "copying"])
def test_mapreduce_entanglement_keeps_each_shards_reference(executor):
    """Round 2 of every shard uses that shard's round-1 consensus as reference (it used the members' mean every round)."""
    generator = np.random.default_rng(0)
    layout = {"a": 6, "b": 4}
    rounds = [[{k: generator.normal(size=size) for k, size in layout.items()} for _ in range(4)] for _ in range(3)]
    rule, topology = Entanglement(), MapReduce(num_reducers=2)
    assert topology.shards(layout) == [["a"], ["b"]]
    expected = {k: [] for k in layout}
    for key in layout:
        reference = None
        for payloads in rounds:
            rows = np.stack([p[key] for p in payloads])
            consensus = _entangled(rows, rows.mean(axis=0) if reference is None else reference)
            expected[key].append(consensus)
            reference = consensus
    saved = None
    for index, payloads in enumerate(rounds):
        result, _ = topology.reduce(payloads, [payload_nbytes(p) for p in payloads], rule, None, [1.0] * 4, executor, layout)
        for key in layout:
            np.testing.assert_allclose(result.state[key].numpy(), expected[key][index], rtol=0, atol=1e-12)
        if index == 0:
            saved = copy.deepcopy(rule.state_dict())
    # the shards' references are in the rule's state (what checkpoints save), and a restored rule continues alike
    assert sorted(saved["shards"]) == ["a", "b"] and saved["reference"] is None
    np.testing.assert_allclose(saved["shards"]["a"]["reference"].numpy(), expected["a"][0], rtol=0, atol=1e-12)
    restored = Entanglement()
    restored.load_state_dict(saved)
    result, _ = topology.reduce(rounds[1], [payload_nbytes(p) for p in rounds[1]], restored, None, [1.0] * 4, executor, layout)
    for key in layout:
        np.testing.assert_allclose(result.state[key].numpy(), expected[key][1], rtol=0, atol=1e-12)


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
