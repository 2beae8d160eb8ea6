"""The Ensemble module and its combination rules (no Ray)."""

from __future__ import annotations

import copy
import logging
import time

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


def test_auto_combiner_averages_until_integer_targets_show_class_logits():
    outputs = torch.randn(2, 6, 3)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    combiner = AutoCombiner()
    torch.testing.assert_close(combiner(outputs, weights), outputs.mean(0))  # no targets seen: averaged
    combiner.observe_targets(outputs, torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 1.0]))  # float targets say nothing
    combiner.observe_targets(outputs, torch.zeros(5, dtype=torch.long))  # another batch size: not this output's targets
    torch.testing.assert_close(combiner(outputs, weights), outputs.mean(0))
    combiner.observe_targets(outputs, torch.tensor([0, 1, 2, 0, 1, 1]))
    torch.testing.assert_close(combiner(outputs, weights), ProbabilityCombiner()(outputs, weights))
    combiner.observe_targets(outputs, torch.tensor([0, 1, 3, 0, 1, 1]))  # class 3 cannot be one of 3 columns
    torch.testing.assert_close(combiner(outputs, weights), outputs.mean(0))
    torch.testing.assert_close(MeanCombiner()(outputs, weights), outputs.mean(0))


class _LogitsAndFeatures(nn.Module):
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        features = torch.tanh(self.body(x))
        logits = self.head(features)
        return {"embedding": features, "logits": logits} if self.as_dict else (logits, features)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_auto_combiner_combines_only_the_leaf_that_matches_the_targets(as_dict):
    torch.manual_seed(0)
    ensemble = Ensemble([_LogitsAndFeatures(as_dict) for _ in range(3)]).eval()
    x, y = torch.randn(8, 64), torch.arange(8) % 10
    logits_key, features_key = ("logits", "embedding") if as_dict else (0, 1)
    with torch.no_grad():
        stacked = ensemble.member_outputs(x)
        before = ensemble(x)
        torch.testing.assert_close(before[logits_key], stacked[logits_key].mean(0))  # no targets seen yet: averaged
        ensemble.combiner.observe_targets(stacked, y)
        after = ensemble(x)
    weights = ensemble.active_weights()
    # 32 feature columns also exceed the targets, but the 10 logits are the fewest columns that do
    assert ensemble.combiner.logits.path == ("['logits']" if as_dict else "[0]")
    torch.testing.assert_close(after[logits_key], ProbabilityCombiner()(stacked[logits_key], weights))
    torch.testing.assert_close(after[features_key], stacked[features_key].mean(0))


def test_auto_combiner_with_a_given_probability_leaf_needs_no_targets():
    torch.manual_seed(0)
    ensemble = Ensemble([_LogitsAndFeatures() for _ in range(2)], combine=AutoCombiner(probability_leaf="[0]")).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        stacked = ensemble.member_outputs(x)
        logits, features = ensemble(x)
        ensemble.combiner.observe_targets(stacked, torch.zeros(5, dtype=torch.long))  # the given leaf stays
    torch.testing.assert_close(logits, ProbabilityCombiner()(stacked[0], ensemble.active_weights()))
    torch.testing.assert_close(features, stacked[1].mean(0))
    assert ensemble.combiner.logits.path == "[0]"
    with pytest.raises(TypeError, match="probability_leaf"):
        AutoCombiner(probability_leaf=0)


def test_ensemble_owns_a_copy_of_the_combiner():
    combiner = AutoCombiner()
    ensemble = Ensemble(_members(2), combine=combiner)
    ensemble.combiner.observe_targets(torch.randn(2, 4, 10), torch.tensor([0, 1, 2, 3]))
    assert ensemble.combiner.logits.path == "" and combiner.logits.path is None


def test_from_states_leaves_out_non_finite_members():
    members = _members(3)
    states = [m.state_dict() for m in members]
    states[1] = {k: v.clone() for k, v in states[1].items()}
    states[1]["net.1.running_var"][0] = float("inf")  # a buffer counts as much as a parameter
    with pytest.warns(UserWarning, match=r"members \[11\] hold NaN or Inf.*keeps members \[10, 12\]"):
        ensemble = Ensemble.from_states(members[0], states, weights=[0.2, 0.3, 0.5], active=[True, True, False], member_ids=[10, 11, 12])
    assert ensemble.num_members == 2 and ensemble.member_ids == [10, 12] and ensemble.excluded_members == [11]
    torch.testing.assert_close(ensemble.weights, torch.tensor([0.2, 0.5], dtype=torch.float64))
    assert ensemble.active.tolist() == [True, False] and ensemble.active_member_ids() == [10]
    nan = [{k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in s.items()} for s in states[:2]]
    with pytest.raises(ValueError, match=r"every member \(\[0, 1\]\) hold NaN or Inf"):
        Ensemble.from_states(members[0], nan)


def test_unknown_combiner_named_in_error():
    with pytest.raises(ValueError, match="combine='vote'"):
        resolve_combiner("vote")


@torch.no_grad()  # evaluation: with gradients on, the members are evaluated looped
def test_vectorised_and_looped_member_outputs_agree():
    members = _members()
    x = torch.randn(7, 64)
    fast = Ensemble(copy.deepcopy(members)).eval()
    slow = Ensemble(copy.deepcopy(members), vectorize=False).eval()
    out_fast = fast.member_outputs(x)
    assert fast.vectorize, "vmap should handle a plain MLP with BatchNorm in eval mode"
    torch.testing.assert_close(out_fast, slow.member_outputs(x))
    torch.testing.assert_close(out_fast, torch.stack([m(x) for m in members]))


class ReadsItsOutput(nn.Module):
    """A model vmap cannot run: its forward reads a value of its output (``.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def forward(self, x):
        out = self.layer(x)
        return out * 2 if out.sum().item() > 0 else out


@torch.no_grad()  # evaluation: with gradients on, the members are evaluated looped
def test_members_vmap_cannot_run_are_evaluated_in_turn_saying_why(caplog):
    members = [ReadsItsOutput() for _ in range(3)]
    x = torch.randn(7, 64)
    with caplog.at_level(logging.INFO):
        out = Ensemble(members, vectorize=True).eval().member_outputs(x)
    assert "evaluating the members one after another: torch.func.vmap cannot run them" in caplog.text
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))


class SlowCall(nn.Module):
    """A linear member whose every call takes 20 ms: looped, 4 members cost 4 calls; vmapped, one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.linear(x)


@torch.no_grad()  # evaluation: with gradients on, the members are evaluated looped
def test_auto_keeps_vmap_where_it_is_faster(caplog):
    members = [SlowCall().eval() for _ in range(4)]
    ensemble = Ensemble(copy.deepcopy(members)).eval()
    x = torch.randn(5, 64)
    with caplog.at_level(logging.INFO):
        out = ensemble.member_outputs(x)
    assert ensemble.vmap_is_faster == {"cpu": True}
    assert "vectorize='auto' timed 4 members on cpu" in caplog.text
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))


@torch.no_grad()  # evaluation: with gradients on, the members are evaluated looped
def test_auto_keeps_the_loop_where_vmap_is_slower(monkeypatch):
    members = _members(4)
    vmapped, calls = Ensemble._vmap_outputs, []

    def slow_vmap(self, *args):
        calls.append(1)
        time.sleep(0.3)  # well above a cold first loop on a loaded machine (91 ms seen)
        return vmapped(self, *args) + 1e-3  # told apart from the loop's outputs

    monkeypatch.setattr(Ensemble, "_vmap_outputs", slow_vmap)
    ensemble = Ensemble(copy.deepcopy(members)).eval()
    x = torch.randn(5, 64)
    first = ensemble.member_outputs(x)  # the timing evaluation gives the kept (looped) way's outputs
    torch.testing.assert_close(first, torch.stack([m(x) for m in members]))
    assert ensemble.vmap_is_faster == {"cpu": False}
    assert len(calls) == 2  # the untimed first call and the timed one
    assert torch.equal(ensemble.member_outputs(x), first)
    assert len(calls) == 2  # decided: looped from now on


def test_bad_vectorize_named():
    with pytest.raises(ValueError, match="`vectorize`: 'yes' is not known; choose one of"):
        Ensemble(_members(), vectorize="yes")


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
