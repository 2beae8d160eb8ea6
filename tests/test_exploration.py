"""Tests for the exploration noise maths (hqde_lightning.exploration)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hqde_lightning.exploration import SCHEDULES, add_noise_, member_generator, noise_scale


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        ("cosine", 0.0, 1.0),
        ("cosine", 0.5, 0.5),
        ("cosine", 1.0, 0.0),
        ("linear", 0.0, 1.0),
        ("linear", 0.25, 0.75),
        ("linear", 1.0, 0.0),
        ("constant", 0.0, 1.0),
        ("constant", 1.0, 1.0),
        ("cosine", -3.0, 1.0),
        ("linear", 7.0, 0.0),
    ],
)
def test_noise_scale_values(schedule: str, progress: float, expected: float) -> None:
    assert noise_scale(schedule, 2.0, progress) == pytest.approx(2.0 * expected, abs=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_reach_exactly_zero(schedule: str) -> None:
    assert noise_scale(schedule, 5e-3, 1.0) == 0.0
    assert noise_scale(schedule, 5e-3, 1.5) == 0.0


@settings(deadline=None, max_examples=100)
@given(schedule=st.sampled_from(SCHEDULES), base=st.floats(0, 10), p=st.floats(0, 1), q=st.floats(0, 1))
def test_noise_scale_is_bounded_and_non_increasing(schedule: str, base: float, p: float, q: float) -> None:
    low, high = sorted((p, q))
    assert 0.0 <= noise_scale(schedule, base, high) <= noise_scale(schedule, base, low) <= base * (1 + 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "exponential", "base_scale": 1.0, "progress": 0.5}, r"`schedule`.*cosine.*linear.*constant"),
        ({"schedule": "cosine", "base_scale": -1.0, "progress": 0.5}, "`base_scale`"),
        ({"schedule": "cosine", "base_scale": math.inf, "progress": 0.5}, "`base_scale`"),
        ({"schedule": "cosine", "base_scale": 1.0, "progress": math.nan}, "`progress`"),
    ],
)
def test_noise_scale_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        noise_scale(**kwargs)


def _tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(64, 32), torch.randn(32) * 0.01, torch.tensor([1, 2, 3]), torch.randn(5).half()]


def _noised(seed: int, member: int, scale: float = 0.1) -> list[torch.Tensor]:
    tensors = _tensors()
    add_noise_(tensors, scale, member_generator(seed, member))
    return tensors


def test_same_seed_and_member_give_identical_noise() -> None:
    for first, second in zip(_noised(7, 2), _noised(7, 2)):
        assert torch.equal(first, second)


@pytest.mark.parametrize(("seed", "member"), [(7, 3), (8, 2), (0, 0)])
def test_different_members_or_seeds_differ(seed: int, member: int) -> None:
    reference, other = _noised(7, 2), _noised(seed, member)
    assert not torch.equal(reference[0], other[0])
    assert torch.equal(reference[2], other[2])  # integer tensors are never touched


def test_member_generators_are_distinct() -> None:
    draws = {tuple(torch.randn(4, generator=member_generator(s, m)).tolist()) for s in range(5) for m in range(8)}
    assert len(draws) == 40


def test_scale_zero_is_bit_identical() -> None:
    tensors = _tensors()
    tensors[0][0, 0] = -0.0
    before = [t.clone() for t in tensors]
    generator = member_generator(1, 0)
    add_noise_(tensors, 0.0, generator)
    for old, new in zip(before, tensors):
        assert torch.equal(old.view(torch.uint8), new.view(torch.uint8))
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=member_generator(1, 0)))


@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.5])
def test_relative_noise_std_matches_scale_times_rms(scale: float) -> None:
    x = torch.randn(100_000) * 3.0 + 1.0
    rms = x.pow(2).mean().sqrt().item()
    noised = x.clone()
    add_noise_([noised], scale, member_generator(3, 1))
    noise = (noised.double() - x.double())
    # std of 1e5 Gaussian draws: relative standard error ~ 1/sqrt(2e5) ≈ 0.2%; allow 2%
    assert noise.std().item() == pytest.approx(scale * rms, rel=0.02)
    assert abs(noise.mean().item()) < 5 * scale * rms / math.sqrt(x.numel())


def test_absolute_noise_std_matches_scale() -> None:
    x = torch.zeros(100_000)
    add_noise_([x], 0.2, member_generator(4, 0), relative=False)
    assert x.std().item() == pytest.approx(0.2, rel=0.02)


def test_zero_rms_and_non_finite_tensors_skipped() -> None:
    zeros = torch.zeros(10)
    broken = torch.tensor([1.0, math.inf])
    add_noise_([zeros, broken], 0.5, member_generator(0, 0))
    assert torch.equal(zeros, torch.zeros(10))
    assert torch.equal(broken, torch.tensor([1.0, math.inf]))


def test_parameters_in_place_and_dtype_kept() -> None:
    layer = torch.nn.Linear(8, 4).to(torch.float16)
    weight = layer.weight
    before = weight.detach().clone()
    add_noise_(layer.parameters(), 0.1, member_generator(0, 0))
    assert layer.weight is weight and weight.dtype == torch.float16 and weight.requires_grad
    assert not torch.equal(before, weight.detach())


def test_noise_independent_of_tensor_dtype() -> None:
    x32 = torch.ones(50)
    x64 = torch.ones(50, dtype=torch.float64)
    add_noise_([x32], 0.1, member_generator(2, 2))
    add_noise_([x64], 0.1, member_generator(2, 2))
    assert torch.allclose(x32.double(), x64, atol=1e-6)  # same draws; only the add rounds differently


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_noise_on_gpu() -> None:
    base = torch.randn(1000)
    cpu, gpu = base.clone(), base.cuda()
    add_noise_([cpu], 0.1, member_generator(5, 1))
    add_noise_([gpu], 0.1, member_generator(5, 1))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-6)
    device_generator = member_generator(5, 1, device="cuda")
    first, second = gpu.clone(), gpu.clone()
    add_noise_([first], 0.1, device_generator)
    add_noise_([second], 0.1, member_generator(5, 1, device="cuda"))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: add_noise_([torch.ones(2)], -0.1, member_generator(0, 0)), "`scale`"),
        (lambda: add_noise_([torch.ones(2)], math.nan, member_generator(0, 0)), "`scale`"),
        (lambda: add_noise_([torch.ones(2)], 0.1, 42), "`generator`"),
        (lambda: member_generator(-1, 0), "`seed`"),
        (lambda: member_generator(0, -2), "`member_index`"),
        (lambda: member_generator(1.5, 0), "`seed`"),
        (lambda: member_generator(True, 0), "`seed`"),
    ],
)
def test_validation(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
