"""The trained ensemble's evaluation against what its members give by hand: the built-in NLL and disagreement, the
uncertainty API on tuple outputs, calibration and selection with ignore labels and true precisions, gradients
through the ensemble, and what checkpoints keep (each member's own draws, the combine rule, a plain checkpoint)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from models import DigitsDataModule, DigitsModule, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.callbacks import EnsembleSelection
from hqde_lightning.ensemble import AutoCombiner, Combiner
from hqde_lightning.evaluation import EnsembleMetrics
from hqde_lightning.uncertainty import log_mean_probs


def _linear_members(n: int = 3, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> list[nn.Module]:
    members = []
    for i in range(n):
        torch.manual_seed(i)
        member = nn.Linear(6, 4).to(dtype)
        with torch.no_grad():
            member.weight.mul_(scale)
        members.append(member)
    return members


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


# ------------------------------------------------------------------ built-in metrics
def test_nll_of_a_confident_ensemble_is_its_cross_entropy_not_capped():
    """Before, each input's probability was clamped at 1e-12 (a cap of 27.6 nats), so confident mistakes counted too little."""
    x, y = _data()
    logits = torch.stack([m(x) for m in _linear_members(scale=200.0)]).detach()
    metrics = EnsembleMetrics(num_members=3, num_classes=4, device=torch.device("cpu"))
    metrics.update(logits, torch.full((3,), 1 / 3), y)
    values = metrics.compute("test", [0, 1, 2], "")
    per_input = F.nll_loss(log_mean_probs(logits.double()), y, reduction="none")
    assert int((per_input > 40).sum()) >= 5  # inputs the ensemble gets wrong with a probability far below 1e-12
    expected = per_input.mean()
    assert float(values["ensemble/test_nll"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(values["member_0/test_nll"]) == pytest.approx(float(F.cross_entropy(logits[0].double(), y)), rel=1e-5)


def test_disagreement_is_a_mean_over_inputs_whatever_the_batches():
    """Before, it was a mean over batches: a last batch of one input counted as much as a full one."""
    x, y = _data(9)
    logits = torch.stack([m(x) for m in _linear_members()]).detach()
    classes = logits.argmax(-1)
    expected = torch.stack([(classes[i] != classes[j]).float() for i, j in [(0, 1), (0, 2), (1, 2)]]).mean()
    metrics = EnsembleMetrics(num_members=3, num_classes=4, device=torch.device("cpu"))
    for part in (slice(0, 8), slice(8, 9)):
        metrics.update(logits[:, part], torch.full((3,), 1 / 3), y[part])
    assert float(metrics.compute("test", [0, 1, 2], "")["ensemble/test_disagreement"]) == pytest.approx(float(expected))


def test_float64_members_combine_in_float64():
    x, _ = _data()
    members = _linear_members(dtype=torch.float64, scale=40.0)
    ensemble = Ensemble(members, vectorize=False, combine="probability").eval()
    with torch.no_grad():
        expected = log_mean_probs(torch.stack([m(x.double()) for m in members]))
        combined = ensemble(x.double())
    assert combined.dtype == torch.float64
    torch.testing.assert_close(combined, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ the Ensemble's own API
class LogitsAndFeatures(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return self.head(features), features


def test_tuple_outputs_use_the_class_logits_leaf_in_the_uncertainty_api_and_calibration():
    x, y = _data()
    members = [LogitsAndFeatures(i) for i in range(3)]
    named = Ensemble(members, combine=AutoCombiner(probability_leaf="[0]"), vectorize=False).eval()
    with torch.no_grad():
        logits = torch.stack([m(x)[0] for m in members])
    torch.testing.assert_close(named.predict_proba(x), log_mean_probs(logits).exp())
    assert named.predict_with_uncertainty(x)["member_probs"].shape == (3, 40, 4)
    learnt = Ensemble(members, vectorize=False).eval()
    with pytest.raises(ValueError, match=r"predict_proba needs class logits.*\[0\]: \(3, 40, 4\), \[1\]: \(3, 40, 8\)"):
        learnt.predict_proba(x)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    assert learnt.calibrate(loader) == pytest.approx(named.calibrate(loader))  # it learns the leaf from the targets, as `test` does
    assert learnt.combiner.logits.path == "[0]"
    torch.testing.assert_close(learnt.predict_proba(x), named.predict_proba(x))


def test_ignore_labels_count_in_neither_calibration_nor_selection():
    x, y = _data(60)
    ignored = y.clone()
    ignored[::2] = -100
    ignored[1::4] = -1
    kept = ignored >= 0
    members = _linear_members(4)
    on_labels = Ensemble(members, vectorize=False).calibrate(DataLoader(TensorDataset(x[kept], y[kept]), batch_size=16))
    with_ignored = Ensemble(members, vectorize=False).calibrate(DataLoader(TensorDataset(x, ignored), batch_size=16))
    assert with_ignored == pytest.approx(on_labels, rel=1e-6)
    select = EnsembleSelection(k=2, solver="brute_force")
    chosen = select.select(Ensemble(members, vectorize=False), DataLoader(TensorDataset(x, ignored), batch_size=16))
    accuracy = select.member_accuracy
    assert chosen.tolist() == select.select(Ensemble(members, vectorize=False), DataLoader(TensorDataset(x[kept], y[kept]), batch_size=16)).tolist()
    assert accuracy.tolist() == pytest.approx(select.member_accuracy.tolist())


def test_calibration_casts_float32_batches_to_float64_members():
    x, y = _data()
    members = _linear_members(dtype=torch.float64)
    temperature = Ensemble(members, vectorize=False).calibrate(DataLoader(TensorDataset(x, y), batch_size=16))
    assert temperature == pytest.approx(Ensemble(members, vectorize=False).calibrate(DataLoader(TensorDataset(x.double(), y), batch_size=16)))


def test_gradients_reach_the_members_whichever_way_they_are_evaluated():
    """Before, the vmap way ran on detached copies of the members' parameters: no gradient reached them."""
    x, y = _data()
    grads = []
    for vectorize in (True, False):
        ensemble = Ensemble(_linear_members(), vectorize=vectorize).eval()
        F.nll_loss(ensemble(x), y).backward()
        grads.append(ensemble.members[0].weight.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_ensemble_arguments_are_checked_as_their_setters_check_them():
    members = _linear_members()
    for weights in ([1.0, -1.0, 1.0], [1.0, float("nan"), 1.0], [1.0, float("inf"), 1.0], [0.5, 0.5]):
        with pytest.raises(ValueError, match=r"`weights` needs 3 finite non-negative numbers \(one per member\), got \["):
            Ensemble(members, weights=weights)
    with pytest.raises(ValueError, match=r"`active` needs 3 booleans .* got \[False, False, False\]"):
        Ensemble(members, active=[False, False, False])


def test_state_dict_keeps_what_the_auto_rule_learnt():
    x, y = _data()
    members = [LogitsAndFeatures(i) for i in range(3)]
    ensemble = Ensemble(members, vectorize=False).eval()
    ensemble.calibrate(DataLoader(TensorDataset(x, y), batch_size=16))
    rebuilt = Ensemble([LogitsAndFeatures(i + 10) for i in range(3)], vectorize=False).eval()
    rebuilt.load_state_dict(ensemble.state_dict())
    assert rebuilt.combiner.logits.path == "[0]"
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], ensemble(x)[0])


# ------------------------------------------------------------------ after a fit
def _fit(module: DigitsModule, tmp_path, **strategy_kwargs) -> tuple:
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0, **strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, default_root_dir=str(tmp_path), limit_train_batches=6)
    dm = DigitsDataModule()
    trainer.fit(module, datamodule=dm)
    dm.setup("test")
    return trainer, strategy, dm


class DrawsInInit(DigitsModule):
    """A plain attribute and a non-persistent buffer drawn in ``__init__``: each member's own."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(torch.rand(()) * 2 + 0.5)
        self.register_buffer("shift", torch.randn(10), persistent=False)

    def forward(self, x):
        return self.net(x) * self.scale + self.shift


def test_checkpoints_keep_each_members_own_draws(tmp_path):
    """Before, a loaded ensemble's members all held one fresh draw (its outputs 3.2 from the saved ensemble's)."""
    trainer, strategy, dm = _fit(DrawsInInit(), tmp_path)
    saved = strategy.ensemble
    assert len({m.scale for m in saved.members}) == 3
    trainer.save_checkpoint(tmp_path / "ensemble.ckpt")
    loaded = Ensemble.load_from_checkpoint(str(tmp_path / "ensemble.ckpt"), DrawsInInit)
    assert [m.scale for m in loaded.members] == [m.scale for m in saved.members]
    x = dm.test.tensors[0][:50]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved.eval()(x))


@pytest.mark.parametrize("members_per_worker", ["auto", 1, 2], ids=["group", "member-actors", "group-actors"])
def test_checkpoints_written_during_the_fit_keep_each_members_own_draws(tmp_path, members_per_worker, request):
    """Member and group actors wrote entries without them before: a loaded ensemble's members held your module's draw.
    With two group actors (members 0-1 and 2) the writer compares its own members with the other actor's snapshot."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if members_per_worker != "auto":
        request.getfixturevalue("ray_session")
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0, members_per_worker=members_per_worker)
    trainer = quiet_trainer(
        strategy=strategy, default_root_dir=str(tmp_path), limit_train_batches=6, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    dm = DigitsDataModule()
    trainer.fit(DrawsInInit(), datamodule=dm)
    loaded = Ensemble.load_from_checkpoint(str(tmp_path / "last.ckpt"), DrawsInInit)
    assert [m.scale for m in loaded.members] == [m.scale for m in strategy.ensemble.members]
    assert all(torch.equal(a.shift, b.shift) for a, b in zip(loaded.members, strategy.ensemble.members))


class DrawsUnsafeThings(DrawsInInit):
    """A numpy array drawn in ``__init__`` (``weights_only`` loading cannot read numpy arrays) and a dataset kept on
    the module (your data: never copied into checkpoints)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise = torch.rand(3).numpy()
        self.data = TensorDataset(torch.randn(4000, 64))


def test_attributes_a_checkpoint_cannot_keep_are_named_and_data_is_left_alone(tmp_path):
    trainer, strategy, _ = _fit(DrawsUnsafeThings(), tmp_path)
    with pytest.warns(UserWarning, match=r"the members' attributes \['noise'\] differ but are left out of the file"):
        trainer.save_checkpoint(tmp_path / "ensemble.ckpt")
    entries = torch.load(tmp_path / "ensemble.ckpt", weights_only=True)["hqde"]["members"]
    assert [sorted(e["extras"]["attributes"]) for e in entries] == [["scale"]] * 3  # the draws it can keep, no data


class MedianOfMembers(Combiner):
    """The element-wise median of the members' outputs (a rule of the user's own)."""

    def __call__(self, outputs, weights):
        return outputs.median(dim=0).values


def test_a_custom_combine_rule_is_named_when_loading_and_can_be_passed_again(tmp_path):
    trainer, strategy, dm = _fit(DigitsModule(), tmp_path, combine=MedianOfMembers())
    trainer.save_checkpoint(tmp_path / "median.ckpt")
    with pytest.warns(UserWarning, match=r"combined its members with test_ensemble_evaluation.MedianOfMembers, a rule of yours"):
        Ensemble.load_from_checkpoint(str(tmp_path / "median.ckpt"), DigitsModule)
    loaded = Ensemble.load_from_checkpoint(str(tmp_path / "median.ckpt"), DigitsModule, combine=MedianOfMembers())
    x = dm.test.tensors[0][:50]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), strategy.ensemble.eval()(x))


def test_testing_a_plain_checkpoint_evaluates_its_weights_and_keeps_the_ensemble(tmp_path):
    """Before, ``trainer.test(ckpt_path=<plain checkpoint>)`` loaded the file into your module but reported the old ensemble."""
    trainer, strategy, dm = _fit(DigitsModule(), tmp_path)
    baseline = DigitsModule(lr=0.5)
    plain = quiet_trainer(limit_train_batches=2)
    plain.fit(baseline, datamodule=DigitsDataModule())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    before = trainer.test(DigitsModule(), datamodule=dm, verbose=False)[0]
    with pytest.warns(UserWarning, match="holds no HQDE ensemble"):
        (from_file,) = trainer.test(DigitsModule(), datamodule=dm, ckpt_path=str(tmp_path / "plain.ckpt"), verbose=False)
    (alone,) = plain.test(baseline, datamodule=dm, verbose=False)
    assert "ensemble/test_acc" not in from_file and from_file["test_acc"] == pytest.approx(alone["test_acc"])
    again = trainer.test(DigitsModule(), datamodule=dm, verbose=False)[0]
    assert again["ensemble/test_acc"] == pytest.approx(before["ensemble/test_acc"])


def test_selection_names_the_members_it_kept_by_their_index_in_the_run(caplog):
    members = _linear_members(3)
    ensemble = Ensemble(members, member_ids=[0, 2, 3], vectorize=False)
    x, y = _data()
    selection = EnsembleSelection(k=2, solver="brute_force")
    mask = selection.select(ensemble, DataLoader(TensorDataset(x, y), batch_size=16))
    ensemble.set_active(mask)
    with caplog.at_level(logging.INFO):
        selection.on_ensemble_fit_end(quiet_trainer(), SimpleNamespace(ensemble=ensemble), lambda: DataLoader(TensorDataset(x, y), batch_size=16))
    assert f"members {ensemble.active_member_ids()}" in caplog.text


def test_a_true_precision_converts_the_members_not_the_combination_weights(tmp_path):
    """Before, ``"bf16-true"`` converted the whole stored ensemble: its float64 temperature and weights were rounded to
    bfloat16 (1.37 -> 1.367) for good, and checkpoints kept the rounded values."""
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0)
    trainer = quiet_trainer(strategy=strategy, default_root_dir=str(tmp_path), limit_train_batches=4, precision="bf16-true")
    dm = DigitsDataModule()
    trainer.fit(DigitsModule(), datamodule=dm)
    strategy.ensemble.temperature.fill_(1.37)
    strategy.ensemble.set_weights([0.5, 0.3, 0.2])
    trainer.test(DigitsModule(), datamodule=dm, verbose=False)
    assert strategy.ensemble.members[0].net[0].weight.dtype == torch.bfloat16
    assert strategy.ensemble.temperature.dtype == torch.float64 and float(strategy.ensemble.temperature) == 1.37
    assert strategy.ensemble.weights.tolist() == [0.5, 0.3, 0.2]
