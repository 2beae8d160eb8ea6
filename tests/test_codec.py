"""The sync codec (payload types, sizes, layouts), ``apply_sync``, and the one aggregation call per round."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import DigitsDataModule, DigitsModule
from torch import nn

from hqde_lightning import HQDEStrategy
from hqde_lightning.aggregation import Mean, RobustAggregator, Superposition
from hqde_lightning.codec import SYNC_MODES, apply_sync, decode_payload, distance_to_consensus, payload_layout, payload_nbytes, state_to_numpy
from hqde_lightning.compression import analytical_nbytes, decode, encode
from hqde_lightning.topology import Flat, LocalExecutor, aggregate


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 4))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ payloads
def test_raw_payload_decodes_sizes_and_lays_out():
    state = _state()
    payload = state_to_numpy(state)
    decoded = decode_payload(payload)
    assert list(decoded) == list(state)
    for key, value in state.items():
        assert torch.equal(decoded[key], value)
    assert list(decode_payload(payload, ["1.bias", "0.weight"])) == ["1.bias", "0.weight"]
    assert payload_nbytes(payload) == 4 * (20 * 30 + 30 + 30 * 4 + 4)
    assert payload_layout(payload) == {"0.weight": 600, "0.bias": 30, "1.weight": 120, "1.bias": 4}


def test_quantized_payload_decodes_sizes_and_lays_out():
    state = _state()
    payload = encode(state, 8, block_size=64)
    decoded = decode_payload(payload)
    for key, value in decode(payload).items():
        assert torch.equal(decoded[key], value)
    (only,) = decode_payload(payload, ["0.weight"]).values()
    assert torch.equal(only, decoded["0.weight"])
    assert payload_nbytes(payload) == payload.nbytes == analytical_nbytes(state, 8, block_size=64)
    assert payload_nbytes(payload) < payload_nbytes(state_to_numpy(state))
    assert payload_layout(payload) == payload_layout(state_to_numpy(state))


def test_bfloat16_state_travels_widened_to_float32():
    payload = state_to_numpy({"w": torch.ones(3, dtype=torch.bfloat16)})
    assert payload["w"].dtype == np.float32 and payload_nbytes(payload) == 12


@pytest.mark.parametrize(
    "payload",
    [
        # looks like an EncodedState (``tensors`` and ``decode``): the codec used to guess from these attributes
        SimpleNamespace(tensors={"w": np.zeros(3)}, decode=lambda: {"w": torch.zeros(3)}, nbytes=12),
        ({"w": np.zeros(3, dtype=np.float32)}, [1.0]),
        [np.zeros(3)],
    ],
    ids=["duck-typed", "tuple", "list"],
)
def test_unknown_payload_types_are_refused(payload):
    for function in (decode_payload, payload_nbytes, payload_layout):
        with pytest.raises(TypeError, match="dict of numpy arrays or a compression.EncodedState"):
            function(payload)


# ---------------------------------------------------------------- apply_sync
def test_apply_sync_modes():
    state = {"w": torch.tensor([1.0, 2.0, 4.0]), "b": torch.tensor([0.5], dtype=torch.float64)}
    before = copy.deepcopy(state)
    consensus = {"w": np.array([3.0, 2.0, 0.0], dtype=np.float32), "b": torch.tensor([1.5], dtype=torch.float64)}
    kept = apply_sync(state, consensus, "none", 0.5)
    pulled = apply_sync(state, consensus, "elastic", 0.25)
    replaced = apply_sync(state, consensus, "replace", 0.25)
    assert torch.equal(kept["w"], state["w"]) and kept["w"].data_ptr() != state["w"].data_ptr()
    assert torch.equal(pulled["w"], torch.tensor([1.5, 2.0, 3.0]))  # w + 0.25 (c - w)
    assert torch.equal(pulled["b"], torch.tensor([0.75], dtype=torch.float64))
    assert torch.equal(replaced["w"], torch.tensor([3.0, 2.0, 0.0])) and torch.equal(replaced["b"], consensus["b"])
    assert torch.equal(apply_sync(state, consensus, "elastic", 1.0)["w"], replaced["w"])
    for key in state:  # pure: the member's tensors are untouched
        assert torch.equal(state[key], before[key])
    assert set(SYNC_MODES) == {"none", "elastic", "replace"}


def test_apply_sync_keeps_the_members_dtype_and_only_consensus_keys():
    state = {"w": torch.ones(4, dtype=torch.bfloat16), "frozen": torch.zeros(2)}
    out = apply_sync(state, {"w": np.full(4, 3.0, dtype=np.float32)}, "elastic", 0.5)
    assert list(out) == ["w"] and out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.full((4,), 2.0, dtype=torch.bfloat16))


def test_apply_sync_returns_writable_tensors_from_a_read_only_consensus():
    array = np.full(3, 2.0, dtype=np.float32)
    array.setflags(write=False)  # as a consensus read from the object store
    out = apply_sync({"w": torch.zeros(3)}, {"w": array}, "replace", 1.0)
    out["w"].add_(1.0)
    assert np.array_equal(array, np.full(3, 2.0, dtype=np.float32))


def test_apply_sync_rejects_bad_input():
    with pytest.raises(ValueError, match=r"`mode='average'`.*\['none', 'elastic', 'replace'\]"):
        apply_sync({"w": torch.zeros(1)}, {"w": np.zeros(1)}, "average", 0.5)
    with pytest.raises(ValueError, match="lacks"):
        apply_sync({"w": torch.zeros(1)}, {"v": np.zeros(1)}, "replace", 1.0)


def test_distance_to_consensus():
    state = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0], dtype=torch.float16)}
    consensus = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([5.0], dtype=np.float32)}
    assert distance_to_consensus(state, consensus) == pytest.approx(5.0)


# ------------------------------------------------------- one aggregation call
def test_aggregate_drops_scores_when_one_is_unknown():
    states = [_state(seed) for seed in range(3)]
    unknown = aggregate(Superposition(), states, [1.0, None, 3.0])
    plain = Superposition()(states)
    torch.testing.assert_close(unknown.member_weights, plain.member_weights)
    scored = aggregate(Superposition(), states, [1.0, 2.0, 3.0])
    assert not torch.allclose(scored.member_weights, plain.member_weights)


def test_flat_reduce_advances_a_stateful_rule_as_one_round():
    """``Flat.reduce`` is the coordinator's path: the rule itself runs, reputations keyed by member index."""
    states = [_state(seed) for seed in range(5)]
    states[4] = {k: -50.0 * v for k, v in states[4].items()}
    payloads = [state_to_numpy(s) for s in states]
    members = [0, 2, 3, 5, 6]
    rule, reference = RobustAggregator(Mean()), RobustAggregator(Mean())
    result, comm = Flat().reduce(payloads, [payload_nbytes(p) for p in payloads], rule, None, [1.0] * 5, LocalExecutor(), payload_layout(payloads[0]), members)
    expected = reference(states, sample_counts=[1.0] * 5, members=members)
    assert result.excluded == expected.excluded == [4]
    for key, value in expected.state.items():
        torch.testing.assert_close(result.state[key], value)
    assert torch.equal(rule.tracker.weights, reference.tracker.weights)
    assert float(rule.tracker.weights[6]) < 1.0 == float(rule.tracker.weights[5])  # member 6, flagged, lost reputation
    assert comm.rounds == 1


def test_coordinator_reduces_flat_rounds_through_the_topology(ray_session, tmp_path):
    class TaggedFlat(Flat):  # defined here so that it travels to the coordinator by value
        """The flat topology, marking every round it reduces in the round's info."""

        def reduce(self, payloads, sizes, rule, scores, weights, executor, layout, members=None):
            result, comm = super().reduce(payloads, sizes, rule, scores, weights, executor, layout, members)
            result.info["reduced_by"] = "TaggedFlat"
            return result, comm

    strategy = HQDEStrategy(num_members=2, sync="replace", topology=TaggedFlat(), seed=3)
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_train_batches=3, limit_val_batches=1,
    )
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    (sync,) = strategy.sync_history
    assert sync["topology"] == "flat" and sync["info"]["reduced_by"] == "TaggedFlat" and sync["comm_rounds"] == 1
