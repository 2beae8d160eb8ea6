"""The Ensemble module and its combination rules (no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import DigitsModule
from torch import nn

from hqde_lightning.ensemble import AutoCombiner, Ensemble, MeanCombiner, ProbabilityCombiner, resolve_combiner


def _members(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [DigitsModule().eval() for _ in range(n)]


def test_probability_combiner_is_log_of_weighted_mean_probability():
    logits = torch.randn(3, 5, 4)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    combined = ProbabilityCombiner()(logits, weights)
    expected = (torch.softmax(logits, -1) * weights.float().view(-1, 1, 1)).sum(0)
    torch.testing.assert_close(combined.exp(), expected)


def test_auto_combiner_uses_probabilities_for_logits_and_mean_otherwise():
    logits = torch.randn(2, 6, 3)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(AutoCombiner()(logits, weights), ProbabilityCombiner()(logits, weights))
    regression = torch.randn(2, 6)
    torch.testing.assert_close(AutoCombiner()(regression, weights), regression.mean(0))
    torch.testing.assert_close(MeanCombiner()(logits, weights), logits.mean(0))


def test_unknown_combiner_named_in_error():
    with pytest.raises(ValueError, match="combine='vote'"):
        resolve_combiner("vote")


def test_vectorised_and_looped_member_outputs_agree():
    members = _members()
    x = torch.randn(7, 64)
    fast = Ensemble(copy.deepcopy(members)).eval()
    slow = Ensemble(copy.deepcopy(members), vectorize=False).eval()
    out_fast = fast.member_outputs(x)
    assert fast.vectorize, "vmap should handle a plain MLP with BatchNorm in eval mode"
    torch.testing.assert_close(out_fast, slow.member_outputs(x))
    torch.testing.assert_close(out_fast, torch.stack([m(x) for m in members]))


def test_inactive_members_do_not_vote():
    members = _members()
    x = torch.randn(4, 64)
    ensemble = Ensemble(members).eval()
    ensemble.set_active([True, False, False])
    torch.testing.assert_close(ensemble.predict_proba(x), torch.softmax(members[0](x), -1))
    with pytest.raises(ValueError, match="at least one True"):
        ensemble.set_active([False, False, False])


def test_uncertainty_decomposition():
    members = _members()
    x = torch.randn(16, 64)
    out = Ensemble(members).eval().predict_with_uncertainty(x)
    assert out["probs"].shape == (16, 10) and out["member_probs"].shape == (3, 16, 10)
    assert torch.all(out["mutual_information"] >= 0)
    assert torch.all(out["mutual_information"] <= out["entropy"] + 1e-6)
    same = Ensemble([copy.deepcopy(members[0]) for _ in range(3)]).eval().predict_with_uncertainty(x)
    assert float(same["mutual_information"].max()) < 1e-5, "identical members do not disagree"


def test_state_dict_round_trip_keeps_weights_and_activity():
    ensemble = Ensemble(_members(), weights=[0.2, 0.3, 0.5], active=[True, True, False])
    clone = Ensemble(_members(), vectorize=False)
    clone.load_state_dict(ensemble.state_dict())
    assert clone.active.tolist() == [True, True, False]
    torch.testing.assert_close(clone.weights, ensemble.weights)
