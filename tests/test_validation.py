"""One set of argument checks: TypeError/ValueError in the plain modules, MisconfigurationException at the Lightning boundary."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule, quiet_trainer

from hqde_lightning import HQDEStrategy
from hqde_lightning.aggregation import GeometricMedian, Krum, resolve_aggregator
from hqde_lightning.callbacks import AdaptiveQuantization, EnsembleSelection, PerformanceMonitor, QuantumNoise
from hqde_lightning.compression import BitPlan, encode, plan_bits
from hqde_lightning.ensemble import resolve_combiner
from hqde_lightning.exploration import member_generator, noise_scale
from hqde_lightning.misconfiguration import InvalidArgument
from hqde_lightning.selection import anneal
from hqde_lightning.topology import resolve_topology
from hqde_lightning.validation import (
    ArgumentError,
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_mapping,
    check_number,
    check_optional,
)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int(0, "k", 1), "`k` must be >= 1, got 0"),
        (lambda: check_int(7, "k", 1, 5), r"`k` must be in \[1, 5\], got 7"),
        (lambda: check_number(0.5, "beta", 0, 0.5, open_high=True), r"`beta` must be in \[0, 0.5\), got 0.5"),
        (lambda: check_number(float("inf"), "tol", 0, open_low=True), "`tol` must be finite and > 0, got inf"),
        (lambda: check_number(float("nan"), "progress", finite=False), "`progress` must be a number, got nan"),
        (lambda: check_choice("x", "sync", ("none", "elastic")), r"`sync`: 'x' is not known; choose one of \['none', 'elastic'\]"),
        (lambda: check_choice(8.0, "bits", (4, 8)), r"`bits`: 8.0 is not known; choose one of \[4, 8\]"),
        (lambda: check_optional(check_int, -1, "seed", 0), "`seed` must be >= 0 or None, got -1"),
        (lambda: check_mapping({"cpus": 1}, "resources", ("num_cpus",)), r"`resources` has unknown keys \['cpus'\]; allowed keys are \['num_cpus'\]"),
    ],
)
def test_bad_values_raise_value_error_naming_parameter_and_allowed_values(call, message):
    with pytest.raises(ArgumentError, match=message) as info:
        call()
    assert type(info.value) is ArgumentError and isinstance(info.value, ValueError) and not isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: check_int(2.5, "num_members", 1), "num_members"),
        (lambda: check_int(True, "num_members", 1), "num_members"),
        (lambda: check_number("1", "strength", 0), "strength"),
        (lambda: check_bool(1, "bagging"), "bagging"),
        (lambda: check_mapping("x", "ray_init_kwargs"), "ray_init_kwargs"),
        (lambda: member_generator(1.5, 0), "seed"),
        (lambda: GeometricMedian(max_iter=2.5), "max_iter"),
        (lambda: Krum(num_byzantine=True), "num_byzantine"),
        (lambda: anneal(np.eye(2), num_reads=2.0), "num_reads"),
        (lambda: resolve_aggregator(3), "aggregator"),
        (lambda: resolve_topology(3), "topology"),
        (lambda: resolve_combiner(3), "combine"),
    ],
)
def test_bad_types_raise_type_error_that_is_also_a_value_error(call, name):
    with pytest.raises(TypeError, match=f"`{name}") as info:
        call()
    assert isinstance(info.value, ArgumentTypeError) and isinstance(info.value, ValueError)
    assert info.value.name == name


def test_checks_return_the_converted_value():
    assert check_int(np.int64(3), "k", 1) == 3 and type(check_int(np.int64(3), "k", 1)) is int
    assert check_number(np.float32(0.25), "x", 0, 1) == 0.25
    assert check_optional(check_int, None, "seed", 0) is None
    assert check_mapping(None, "kwargs") == {}
    assert check_choice("elastic", "sync", ("none", "elastic")) == "elastic"


def test_argument_errors_survive_pickling():
    # errors raised inside Ray actors travel to the driver pickled
    error = pickle.loads(pickle.dumps(ArgumentTypeError("seed", 1.5, "an integer >= 0")))
    assert isinstance(error, TypeError) and str(error) == "`seed` must be an integer >= 0, got 1.5" and error.name == "seed"
    boundary = pickle.loads(pickle.dumps(InvalidArgument("`QuantumNoise(scale=-1)`: bad")))
    assert isinstance(boundary, MisconfigurationException) and isinstance(boundary, ValueError)


def test_plain_modules_keep_their_messages():
    with pytest.raises(ValueError, match="`schedule`: 'step' is not known"):
        noise_scale("step", 1.0, 0.5)
    with pytest.raises(ValueError, match=r"`bits`: 5 is not known; choose one of \[4, 8, 16, 32\]"):
        encode({"w": torch.ones(4)}, 5)
    with pytest.raises(ValueError, match="need `min_bits` <= `base_bits` <= `max_bits`"):
        BitPlan(min_bits=16)
    state = {"w": torch.randn(600)}
    assert {k: v.tolist() for k, v in plan_bits(state, block_size=100).items()} == {
        k: v.tolist() for k, v in BitPlan(block_size=100).assign(state).items()
    }


@pytest.mark.parametrize(
    ("factory", "call"),
    [
        (lambda: HQDEStrategy(sync_strength=2), r"`HQDEStrategy\(sync_strength=2\)`: `sync_strength` must be in \[0, 1\]"),
        (lambda: QuantumNoise(scale=-1.0), r"`QuantumNoise\(scale=-1.0\)`: `scale` must be finite and >= 0"),
        (lambda: QuantumNoise(relative=1), r"`QuantumNoise\(relative=1\)`: `relative` must be True or False"),
        (lambda: AdaptiveQuantization(block_size=0), r"`AdaptiveQuantization\(block_size=0\)`: `block_size` must be >= 1"),
        (lambda: AdaptiveQuantization(min_bits=16), "AdaptiveQuantization: need `min_bits` <= `base_bits`"),
        (lambda: EnsembleSelection(solver="exact"), r"`EnsembleSelection\(solver='exact'\)`: `solver`: 'exact' is not known"),
        (lambda: PerformanceMonitor(log_every_n_steps=0), r"`PerformanceMonitor\(log_every_n_steps=0\)`"),
    ],
)
def test_lightning_boundary_raises_misconfiguration_naming_the_call(factory, call):
    with pytest.raises(MisconfigurationException, match=call) as info:
        factory()
    assert isinstance(info.value, InvalidArgument) and isinstance(info.value, ValueError)


def test_callback_setup_error_is_the_same_kind_as_its_init_errors(tmp_path):
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1, default_root_dir=str(tmp_path), callbacks=[QuantumNoise()])
    with pytest.raises(InvalidArgument, match="anneal_epochs"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
