"""Atomic checkpoint writes and RNG state capture."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from hqde_lightning.checkpoint import AtomicCheckpointIO, capture_rng_states, restore_rng_states


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "model.ckpt"
    io.save_checkpoint({"weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"weights": torch.zeros(3), "bad": _FailsToPickle()}, path)
    torch.testing.assert_close(io.load_checkpoint(path)["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.ckpt"], "no temporary file may be left behind"


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.save(capture_rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
