"""Your module's hooks and your own callbacks in a member group: they run once per member, as that member.

The references are the two other ways the same members train: each member alone with a plain
``Trainer`` (its seed, its data order), and each member in its own Ray actor, where hooks and
callbacks run in the member's own process. A group must give every member what those give it.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, BasePredictionWriter, EarlyStopping, LambdaCallback, ModelCheckpoint, ModelPruning, ModelSummary, StochasticWeightAveraging, TQDMProgressBar
from models import DigitsDataModule, DigitsModule, TanhDigitsModule, quiet_trainer
from test_groups import FIT, MEMBERS, SEED, Net, SeededDigits, assert_same_members, group_states, solo_states

import hqde_lightning.launcher as launcher
from hqde_lightning import HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.embedded import group_blocker
from hqde_lightning.group import MemberGroup


class HookedNet(Net):
    """Hooks whose state lives in plain attributes, drawn from the RNG and read by the steps."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_losses: list[torch.Tensor] = []
        self.epoch_means: list[float] = []

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.jitter = 0.05 * torch.randn(())  # each member's own RNG stream, each member's own attribute

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x + self.jitter), y)
        self.step_losses.append(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("grad_norm", torch.cat([p.grad.flatten() for p in self.parameters()]).norm())

    def on_train_epoch_end(self) -> None:
        self.epoch_means.append(float(torch.stack(self.step_losses).mean()))
        self.log("epoch_mean_loss", self.epoch_means[-1])
        self.step_losses.clear()


def test_hooks_with_attribute_state_run_per_member_as_alone(caplog):
    """Member i's hooks see its own attributes, RNG stream and gradients: it trains exactly as alone."""
    solo = solo_states({}, HookedNet)
    with caplog.at_level(logging.INFO):
        assert_same_members(group_states({}, "auto", HookedNet), solo)
    assert "`HookedNet`'s steps run member by member" in caplog.text  # in a group, not in actors
    assert_same_members(group_states({}, False, HookedNet), solo)


class Recorder(pl.Callback):
    """What a typical callback of yours does: read metrics, read the module, log, keep state."""

    def __init__(self) -> None:
        self.val_acc: list[float] = []
        self.weight_norms: list[float] = []
        self.batch_sizes: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_sizes.append(len(batch[0]))
        self.losses.append(float(outputs["loss"]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_acc.append(float(trainer.callback_metrics["val_acc"]))
        norm = float(pl_module.net[0].weight.norm())
        self.weight_norms.append(norm)
        pl_module.log("first_layer_norm", norm)

    def state_dict(self) -> dict:
        return {"val_acc": list(self.val_acc)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_acc = list(state_dict["val_acc"])


class OutputsModule(DigitsModule):
    """The Lightning 2 pattern: collect step outputs in a list, reduce them at the epoch end."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.correct: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.correct.append((self(x).argmax(-1) == y).float())
        return super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.log("val_acc_from_outputs", torch.cat(self.correct).mean())
        self.correct.clear()


def _fit(members_per_worker, callbacks, tmp_path=None) -> tuple[HQDEStrategy, pl.Trainer]:
    strategy = HQDEStrategy(num_members=3, sync="elastic", seed=0, members_per_worker=members_per_worker, vectorize=False)
    where = {} if tmp_path is None else dict(enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer = quiet_trainer(strategy=strategy, max_epochs=2, callbacks=callbacks, **where)
    pl.seed_everything(0, verbose=False)
    trainer.fit(OutputsModule(), datamodule=SeededDigits())
    return strategy, trainer


def test_hooks_and_callbacks_in_a_group_give_what_member_actors_give(ray_session, tmp_path, caplog):
    """The same fit in a group, as member actors and as group actors (members 0-1 and 2): same members,
    same per-member values from hooks and callbacks."""
    with caplog.at_level(logging.INFO):
        group, group_trainer = _fit("auto", [Recorder()], tmp_path)
    assert "one Ray actor each" not in caplog.text
    actors, actors_trainer = _fit(1, [Recorder()])
    _, group_actors_trainer = _fit(2, [Recorder()])
    for i in range(3):
        for name in ("val_acc", "val_acc_from_outputs", "first_layer_norm"):
            key = f"member_{i}/{name}"
            assert float(group_trainer.callback_metrics[key]) == pytest.approx(float(actors_trainer.callback_metrics[key]), abs=1e-4), key
            assert float(group_actors_trainer.callback_metrics[key]) == pytest.approx(float(actors_trainer.callback_metrics[key]), abs=1e-4), key
        # the hook reduced the member's own outputs: it agrees with the member's torchmetrics accuracy
        assert float(group_trainer.callback_metrics[f"member_{i}/val_acc_from_outputs"]) == pytest.approx(float(group_trainer.callback_metrics[f"member_{i}/val_acc"]), abs=1e-6)
    values = [float(group_trainer.callback_metrics[f"member_{i}/first_layer_norm"]) for i in range(3)]
    assert len(set(values)) == 3  # each member's own weights, not one module's
    for in_group, as_actor in zip(group.ensemble.members, actors.ensemble.members):
        for key, value in as_actor.state_dict().items():
            torch.testing.assert_close(in_group.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    # each member's copy kept its own state: the whole-ensemble checkpoint holds it under the callback's own key
    section = load_checkpoint_file(group_trainer.checkpoint_callback.best_model_path)[HQDE_KEY]
    recorded = [m["callbacks"]["Recorder"]["val_acc"] for m in section["members"]]
    assert [r[-1] for r in recorded] == pytest.approx([float(group_trainer.callback_metrics[f"member_{i}/val_acc"]) for i in range(3)], abs=1e-6)


class BatchRecorder(pl.Callback):
    """Records, in a list every copy shares, what each ``on_train_batch_end`` call gets."""

    calls: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append((batch_idx, len(batch[0]), float(outputs["loss"])))


def test_callback_copies_get_their_members_batch_and_outputs():
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[BatchRecorder()])
    copies = []
    original = MemberGroup.each_member

    def spy(self, hook, call, args=(), positions=None):
        copies.append(hook)
        return original(self, hook, call, args, positions)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MemberGroup, "each_member", spy)
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert copies.count("on_train_batch_end") == 2 * 3  # one call per member and step; hooks it does not override cost nothing
    assert set(copies) == {"on_train_batch_end"}
    calls = BatchRecorder.calls
    assert [c[0] for c in calls] == [0, 0, 1, 1, 2, 2]
    assert {c[1] for c in calls} == {DigitsDataModule().batch_size}  # the member's own batch, not the stacked one
    assert all(a[2] != b[2] for a, b in zip(calls[::2], calls[1::2]))  # each member's own loss


class StopBelow(pl.Callback):
    """Stops its member's fit once the member's validation accuracy reaches ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if float(trainer.callback_metrics["val_acc"]) >= self.threshold:
            trainer.should_stop = True


def test_a_callback_that_stops_the_fit_stops_its_member_only():
    first = HQDEStrategy(num_members=4, sync="none", seed=1, vectorize=False)
    trainer = quiet_trainer(strategy=first, max_epochs=1)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    accuracy = [float(trainer.callback_metrics[f"member_{i}/val_acc"]) for i in range(4)]
    threshold = (min(accuracy) + max(accuracy)) / 2
    stopped = [i for i, a in enumerate(accuracy) if a >= threshold]
    assert 0 < len(stopped) < 4
    strategy = HQDEStrategy(num_members=4, sync="none", seed=1, vectorize=False)
    trainer = quiet_trainer(strategy=strategy, max_epochs=3, callbacks=[StopBelow(threshold)])
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert trainer.current_epoch >= 2
    for i in range(4):
        kept = all(torch.equal(a, b) for a, b in zip(strategy.ensemble.members[i].state_dict().values(), first.ensemble.members[i].state_dict().values()))
        assert kept == (i in stopped), f"member {i}"


class Seen:
    """A list that survives the pickling of the fit (the group trains a copy of your trainer and its callbacks)."""

    norms: list[float] = []


def test_lambda_callback_runs_per_member():
    callback = LambdaCallback(on_train_epoch_end=lambda trainer, pl_module: Seen.norms.append(float(pl_module.net[0].weight.norm())))
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0)
    quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[callback]).fit(DigitsModule(), datamodule=DigitsDataModule())
    assert Seen.norms == pytest.approx([float(m.net[0].weight.norm()) for m in strategy.ensemble.members])


class SavesIntoCheckpoint(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["extra"] = 1


class MyCheckpoint(ModelCheckpoint):
    pass


class SavesModule(DigitsModule):
    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["extra"] = 1


class StepsItsOwnOptimizer(DigitsModule):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)


class ConfiguresItsModel(DigitsModule):
    def configure_model(self) -> None:
        pass


class ReturnsCallbacks(DigitsModule):
    """Returns its callbacks from ``configure_callbacks``: a stop on its own metric, and one of its own."""

    norms: list[float] = []

    def configure_callbacks(self):
        record = LambdaCallback(on_train_epoch_end=lambda trainer, pl_module: ReturnsCallbacks.norms.append(float(pl_module.net[0].weight.norm())))
        return [EarlyStopping(monitor="val_loss", patience=100), record]


class ReturnsBackboneFinetuning(DigitsModule):
    def configure_callbacks(self):
        return BackboneFinetuning()


def test_callbacks_your_module_configures_run_in_the_group_as_lightning_attaches_them(caplog):
    """What ``configure_callbacks`` returns runs as the trainer's callbacks do (here: your callback as each member) and
    replaces the trainer's of the same class, as in a plain fit (it used to send every member to its own Ray actor)."""
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0)
    # the trainer's stop would fail at the first epoch end (nothing logs `not_logged`): the module's replaces it
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[EarlyStopping(monitor="not_logged")])
    with caplog.at_level(logging.INFO):
        trainer.fit(ReturnsCallbacks(), datamodule=DigitsDataModule())
    assert "one Ray actor each" not in caplog.text
    assert ReturnsCallbacks.norms == pytest.approx([float(m.net[0].weight.norm()) for m in strategy.ensemble.members])


class HooksForTests(DigitsModule):
    def on_test_epoch_end(self) -> None:
        pass


def test_group_blocker_names_what_a_group_cannot_run_per_member():
    def blocker(module=None, callbacks=()):
        trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2), callbacks=list(callbacks), logger=False)
        return group_blocker(trainer.strategy, trainer, module or DigitsModule())

    assert blocker(callbacks=[Recorder(), LambdaCallback(on_fit_start=print)]) is None
    assert blocker(HookedNet()) is None
    assert blocker(HooksForTests()) is None  # a fit never calls test hooks
    assert blocker(callbacks=[StochasticWeightAveraging(swa_lrs=0.01)]) is None  # once for the group (GroupSWA)
    assert blocker(callbacks=[BackboneFinetuning()]) is None  # as each member (`MemberFinetuning`)
    assert "ModelPruning acts on one module" in blocker(callbacks=[ModelPruning("l1_unstructured")])
    assert "MyCheckpoint derives from ModelCheckpoint" in blocker(callbacks=[MyCheckpoint()])
    assert blocker(callbacks=[SavesIntoCheckpoint()]) is None  # as each member, on its own entry
    assert blocker(callbacks=[WritesPredictions(), ReportsTests()]) is None  # nothing to do in a fit
    assert blocker(SavesModule()) is None
    assert blocker(StepsItsOwnOptimizer()) is None  # once for the group: one update for the whole stack
    assert blocker(ReturnsCallbacks()) is None
    assert blocker(ReturnsBackboneFinetuning()) is None
    assert "overrides ['configure_model']" in blocker(ConfiguresItsModel())


class WritesPredictions(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__("epoch")
        self.rows = 0

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        self.rows = sum(len(p) for p in predictions)


class ReportsTests(pl.Callback):
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        pass


def test_callbacks_that_do_nothing_in_a_fit_leave_it_to_the_group_vectorized(monkeypatch):
    """A prediction writer, or a callback of yours with test hooks only, does nothing in a fit: the members train in a
    group with vmap (a writer sent them to threads, one member at a time), and ``predict`` still writes."""
    monkeypatch.setattr(launcher, "MemberThreads", None)  # calling it would fail the fit
    writer, model = WritesPredictions(), DigitsModule()
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0, vectorize=True)
    trainer = quiet_trainer(strategy=strategy, limit_train_batches=3, limit_val_batches=0, callbacks=[writer, ReportsTests()])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*`vectorize=True` is ignored")
        trainer.fit(model, datamodule=DigitsDataModule())
    trainer.predict(model, datamodule=DigitsDataModule(), return_predictions=False)
    assert writer.rows == 300  # the digits test split, which the datamodule predicts


class BarWithoutVersion(TQDMProgressBar):
    """A progress bar of yours, as Lightning's docs show one: the bar without the version number."""

    shown: list[dict] = []

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        BarWithoutVersion.shown.append(metrics)
        return metrics


class MySummary(ModelSummary):
    pass


def test_your_progress_bar_and_model_summary_show_the_group_once(caplog):
    """Subclasses of Lightning's progress bars and model summaries run once for the group (they used to send every
    member to its own Ray actor): one bar, showing the group's first member's values."""
    bar = BarWithoutVersion(refresh_rate=1)
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=3, limit_val_batches=0, enable_progress_bar=True, callbacks=[bar])
    assert group_blocker(strategy, trainer, DigitsModule()) is None
    with caplog.at_level(logging.INFO):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert "one Ray actor each" not in caplog.text
    assert BarWithoutVersion.shown and all("v_num" not in shown for shown in BarWithoutVersion.shown)
    summary = pl.Trainer(strategy=HQDEStrategy(num_members=2), callbacks=[MySummary()], logger=False)
    assert group_blocker(summary.strategy, summary, DigitsModule()) is None


def test_a_groups_model_summary_lists_your_layers_with_the_totals_of_its_members(caplog):
    """Lightning's summary of the group module was one row (``stack | StackedMembers``); it shows your module's layers, as
    a plain fit does, one member's parameters per layer, and the parameters of all the members in the totals."""
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=3, sync="none", seed=0), limit_train_batches=1, limit_val_batches=0, enable_model_summary=True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.callbacks.model_summary"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    table = caplog.text
    per_member = sum(p.numel() for p in DigitsModule().parameters())
    assert "StackedMembers" not in table and "| net " in table and "Params per member" in table
    assert f"{per_member / 1000:.1f} K " in table.split("| net ")[1].splitlines()[0]  # the row: one member's
    assert f"{3 * per_member / 1000:.1f} K     Total params" in table


def test_vectorize_true_with_per_member_hooks_warns_and_loops():
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=True)
    with pytest.warns(UserWarning, match="`vectorize=True` is ignored"):
        quiet_trainer(strategy=strategy, **FIT).fit(HookedNet(), datamodule=DigitsDataModule())


def _swa_fit(module: type[pl.LightningModule], members_per_worker, vectorize=False, **trainer_kwargs) -> HQDEStrategy:
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0, members_per_worker=members_per_worker, vectorize=vectorize)
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1)
    options = dict(max_epochs=3, limit_val_batches=0, **trainer_kwargs)
    ckpt_path = options.pop("ckpt_path", None)
    trainer = quiet_trainer(strategy=strategy, callbacks=[swa, *options.pop("callbacks", [])], **options)
    trainer.fit(module(), datamodule=SeededDigits(), ckpt_path=ckpt_path)
    return strategy


def _assert_same_ensembles(a: HQDEStrategy, b: HQDEStrategy, atol: float = 1e-5) -> None:
    for i, (x, y) in enumerate(zip(a.ensemble.members, b.ensemble.members)):
        for key, value in y.state_dict().items():
            torch.testing.assert_close(x.state_dict()[key], value, rtol=1e-4, atol=atol, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


@pytest.mark.parametrize("module", [TanhDigitsModule, DigitsModule], ids=["no-batchnorm", "batchnorm"])
def test_swa_in_a_group_gives_each_member_its_own_average(ray_session, tmp_path, module, caplog):
    """StochasticWeightAveraging over the stacked members: each member ends with the average its own actor's SWA computes
    (with BatchNorm, the statistics recomputed per member in the extra epoch); group checkpoints resume in actors."""
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1)
    with caplog.at_level(logging.INFO):
        group = _swa_fit(module, "auto", callbacks=[checkpoints], enable_checkpointing=True)
    assert "one Ray actor each" not in caplog.text
    actors = _swa_fit(module, 1)
    _assert_same_ensembles(group, actors)
    without_swa = HQDEStrategy(num_members=2, sync="none", seed=0, vectorize=False)
    quiet_trainer(strategy=without_swa, max_epochs=3, limit_val_batches=0).fit(module(), datamodule=SeededDigits())
    moved = float((group.ensemble.members[0].net[0].weight - without_swa.ensemble.members[0].net[0].weight).norm())
    assert moved > 1e-3, "SWA changed the weights"
    # a group checkpoint in the SWA window: each member's entry holds its own average under the module's keys
    path = str(tmp_path / "epoch=1-step=38.ckpt")
    entries = load_checkpoint_file(path)[HQDE_KEY]["members"]
    averages = [e["callbacks"]["StochasticWeightAveraging"]["average_model_state"] for e in entries]
    assert set(averages[0]) == set(module().state_dict()) and not torch.equal(averages[0]["net.0.weight"], averages[1]["net.0.weight"])
    if module is TanhDigitsModule:  # resumed as member actors, the fit ends where the uninterrupted one does
        _assert_same_ensembles(_swa_fit(module, 1, ckpt_path=path), actors)
    else:  # vmap steps, then the statistics epoch member by member
        _assert_same_ensembles(_swa_fit(module, "auto", vectorize=True), actors, atol=1e-4)


class LossSum(DigitsModule):
    """Keeps a running sum of its training losses in an attribute, saved into and restored from its checkpoint."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.loss_sum = 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.loss_sum += float(outputs["loss"])

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["loss_sum"] = self.loss_sum

    def on_load_checkpoint(self, checkpoint) -> None:
        self.loss_sum = checkpoint["loss_sum"]


class NormAtSave(pl.Callback):
    """Writes the module's first-layer norm into each checkpoint it saves, and records what it reads back."""

    loaded: list[float] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["norm_at_save"] = float(pl_module.net[0].weight.norm())

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.loaded.append(checkpoint["norm_at_save"])


def _entries(path: str) -> list[dict]:
    return load_checkpoint_file(path)[HQDE_KEY]["members"]


def _checkpointed_fit(tmp_path, name: str, epochs: int, members_per_worker, ckpt_path=None) -> tuple[HQDEStrategy, str]:
    strategy = HQDEStrategy(num_members=3, sync="elastic", seed=0, members_per_worker=members_per_worker, vectorize=False)
    trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, limit_val_batches=0, callbacks=[NormAtSave()], enable_checkpointing=True, default_root_dir=str(tmp_path / name))
    pl.seed_everything(0, verbose=False)
    trainer.fit(LossSum(), datamodule=SeededDigits(), ckpt_path=ckpt_path)
    return strategy, trainer.checkpoint_callback.best_model_path


def test_checkpoint_hooks_write_and_read_each_members_own_entry(ray_session, tmp_path):
    """Your module's and callbacks' ``on_save_checkpoint``/``on_load_checkpoint`` run as each member on its own entry:
    a group writes what member actors write, and a resumed group goes on from each member's own values."""
    _, group_path = _checkpointed_fit(tmp_path, "group", 2, "auto")
    _, actors_path = _checkpointed_fit(tmp_path, "actors", 2, 1)
    group_entries, actor_entries = _entries(group_path), _entries(actors_path)
    assert len({e["loss_sum"] for e in group_entries}) == 3  # each member's own attribute, not one module's
    for in_group, as_actor in zip(group_entries, actor_entries):
        assert in_group["loss_sum"] == pytest.approx(as_actor["loss_sum"], rel=1e-5)
        assert in_group["norm_at_save"] == pytest.approx(as_actor["norm_at_save"], rel=1e-5)
        assert in_group["norm_at_save"] == pytest.approx(float(in_group["state_dict"]["net.0.weight"].norm()), rel=1e-6)  # written as the member
    NormAtSave.loaded.clear()
    _, resumed_path = _checkpointed_fit(tmp_path, "resumed", 3, "auto", group_path)
    assert NormAtSave.loaded == pytest.approx([e["norm_at_save"] for e in group_entries])  # each copy read its member's entry
    _, whole_path = _checkpointed_fit(tmp_path, "whole", 3, "auto")
    assert [e["loss_sum"] for e in _entries(resumed_path)] == pytest.approx([e["loss_sum"] for e in _entries(whole_path)], rel=1e-5)


class Renamed(DigitsModule):
    """Reads checkpoints written before its layers were renamed (``net.`` was ``body.``), renaming in place."""

    def on_load_checkpoint(self, checkpoint) -> None:
        weights = checkpoint["state_dict"]
        for key in self.state_dict():
            weights[key] = weights.pop(key.replace("net.", "body.", 1))


def test_on_load_checkpoint_changes_each_members_entry_before_its_weights_load(tmp_path):
    """A plain checkpoint with old names resumes into a group: every member's hook renames its own copy, then its weights load."""
    plain = DigitsModule()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(plain, datamodule=DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    checkpoint = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    checkpoint["state_dict"] = {k.replace("net.", "body.", 1): v for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "old_names.ckpt")
    strategy = HQDEStrategy(num_members=3, sync="none", seed=0)
    quiet_trainer(strategy=strategy, max_epochs=1, limit_val_batches=0).fit(Renamed(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "old_names.ckpt"))
    for member in strategy.ensemble.members:  # nothing left to train: each member holds the checkpoint's weights
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(member.state_dict()[key], value)
