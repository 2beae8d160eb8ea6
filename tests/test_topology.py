"""Topologies: flat, tree and map-reduce reach the same mean; rounds and bytes are counted."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import DigitsDataModule, DigitsModule
from torch import nn

from hqde_lightning import HQDEStrategy
from hqde_lightning.aggregation import GeometricMedian, Mean
from hqde_lightning.topology import Flat, LocalExecutor, MapReduce, Tree, payload_layout, payload_nbytes, resolve_topology


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
    result, _ = topology.reduce(payloads, sizes, GeometricMedian(), None, [1.0] * 4, LocalExecutor(), payload_layout(payloads[0]))
    assert all(torch.isfinite(v).all() for v in result.state.values())
    assert 2 in result.excluded


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
