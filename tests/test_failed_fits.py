"""What a failed fit leaves: the members as they were where it failed, as a plain fit's module keeps the weights it reached.

Before, a failed fit left `strategy.ensemble` empty (or the last fit's), your module untrained, the trainer at step 0,
and an `OnExceptionCheckpoint` of the driver wrote a file without members (member threads and actors) or with the last
fit's members (a second fit): resuming from it silently started over. Truth: each member trained alone by a plain
`Trainer` for as many steps as it trained before the failure (`max_steps`).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from models import quiet_trainer
from test_groups import FIT, MEMBERS, SEED, Net, assert_same_members, solo_fits, train_loader

from hqde_lightning import HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file, seal_checkpoint

STEPS = FIT["max_epochs"] * FIT["limit_train_batches"]  # 16
FAIL_AT = 11  # epoch 1, its fourth batch


class FailsAtStep(Net):
    """Raises at global step ``fail_at`` (in ``on_train_batch_start``): as member ``member`` only, or as every member."""

    def __init__(self, fail_at: int = -1, member: int | None = None, optimizer: str = "sgd", batchnorm: bool = False, **kwargs) -> None:
        super().__init__(optimizer=optimizer, batchnorm=batchnorm, **kwargs)
        self.save_hyperparameters()

    def on_train_batch_start(self, batch, batch_idx):
        member = self.hparams.member
        if self.trainer.global_step == self.hparams.fail_at and (member is None or self.trainer.strategy.member_index == member):
            raise RuntimeError(f"failed at step {self.hparams.fail_at}")


class RunsInThreads(FailsAtStep):
    """A hook a member group cannot run per member: the members train in threads, one after another."""

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()


class Epochs(pl.Callback):
    """Your callback: what it collects stays on it, as after a plain fit that failed."""

    def __init__(self) -> None:
        self.ended: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.ended.append(trainer.current_epoch)


def _alone(steps: list[int]) -> list[dict[str, torch.Tensor]]:
    """Member i trained alone for ``steps[i]`` steps."""
    fits = {n: solo_fits({"fail_at": -1}, FailsAtStep, fit={**FIT, "max_steps": n}) for n in set(steps)}
    return [fits[n][i][0].state_dict() for i, n in enumerate(steps)]


def _entries(path) -> list[dict]:
    return load_checkpoint_file(str(path))[HQDE_KEY]["members"]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_a_group_that_fails_leaves_its_members_where_they_were(tmp_path, vectorize):
    epochs = Epochs()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    trainer = quiet_trainer(strategy=strategy, **FIT, callbacks=[epochs])
    model = FailsAtStep(fail_at=FAIL_AT)
    with pytest.raises(RuntimeError, match=f"failed at step {FAIL_AT}"):
        trainer.fit(model, train_loader())
    alone = _alone([FAIL_AT] * MEMBERS)
    assert strategy.ensemble is not None, "before: None"
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], alone)
    assert_same_members([model.state_dict()], alone[:1])  # your module: member 0's (independent members)
    assert (trainer.global_step, trainer.current_epoch) == (FAIL_AT, 1), "before: (0, 0)"
    assert epochs.ended == [0], "what your callback collected, as after a plain fit (before: [])"
    trainer.save_checkpoint(tmp_path / "after.ckpt")  # what a user saves after the failure
    entries = _entries(tmp_path / "after.ckpt")
    assert [e["global_step"] for e in entries] == [FAIL_AT] * MEMBERS
    assert_same_members([e["state_dict"] for e in entries], alone)


def test_member_threads_that_fail_leave_a_checkpoint_each_member_resumes_from(tmp_path):
    """Members train in turns: member 0 had finished (16 steps) when member 1 failed at step 11; member 2 trained in
    the turn member 1 gave away when it failed, all of its 16 steps, or had only started, or had not started. Before, the driver's
    `OnExceptionCheckpoint` wrote no members, and resuming from it started over. Resumed, members 0 (and 2, when it had
    finished) stay as they were, member 1 trains its last 5 steps, and a member 2 that had not started trains from its
    own start (not from member 0's weights: independent members)."""
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **FIT, callbacks=[OnExceptionCheckpoint(tmp_path)], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match=f"member 1 failed: failed at step {FAIL_AT}"):
        trainer.fit(RunsInThreads(fail_at=FAIL_AT, member=1), train_loader())
    entries = _entries(tmp_path / "on_exception.ckpt")
    steps = [e.get("global_step") for e in entries]
    assert steps[:2] == [STEPS, FAIL_AT] and steps[2] in (STEPS, 0, None), steps  # member 2: done, started only, not started
    stopped = _alone([n for n in steps if n])
    assert_same_members([e["state_dict"] for e in entries if e.get("global_step")], stopped)
    assert strategy.ensemble.member_ids == [i for i, n in enumerate(steps) if n is not None]
    assert_same_members([m.state_dict() for m, n in zip(strategy.ensemble.members, steps) if n], stopped)

    # as a file where member 2 had not started (its entry empty)
    checkpoint = load_checkpoint_file(str(tmp_path / "on_exception.ckpt"))
    section = {k: v for k, v in checkpoint[HQDE_KEY].items() if k != "checksums"}
    section["members"] = entries[:2] + [{}]
    torch.save(seal_checkpoint({k: v for k, v in checkpoint.items() if k != HQDE_KEY}, section), tmp_path / "unstarted.ckpt")

    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **FIT)
    with pytest.warns(UserWarning, match=r"member 2 has no state of its own in the checkpoint \(it never trained\); it starts as in a new fit"):
        trainer.fit(RunsInThreads(), train_loader(), ckpt_path=tmp_path / "unstarted.ckpt")
    finished = _alone([STEPS] * MEMBERS)
    members = [m.state_dict() for m in strategy.ensemble.members]
    assert_same_members([members[0], members[2]], [finished[0], finished[2]])  # as it was; trained from its own start


def test_a_second_fit_that_fails_leaves_its_own_members_not_the_first_fits(tmp_path):
    """Before, the driver's exception checkpoint and `strategy.ensemble` held the first fit's members: the second fit's
    steps were lost."""
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **FIT, callbacks=[OnExceptionCheckpoint(tmp_path)], enable_checkpointing=True)
    model = FailsAtStep(fail_at=STEPS + 3)
    trainer.fit(model, train_loader())
    first = [{k: v.clone() for k, v in m.state_dict().items()} for m in strategy.ensemble.members]
    trainer.fit_loop.max_epochs = 3
    with pytest.raises(RuntimeError, match=f"failed at step {STEPS + 3}"):
        trainer.fit(model, train_loader())
    assert trainer.global_step == STEPS + 3
    assert [e["global_step"] for e in _entries(tmp_path / "on_exception.ckpt")] == [STEPS + 3] * MEMBERS
    moved = [max((m.state_dict()[k] - f[k]).abs().max().item() for k in f) for m, f in zip(strategy.ensemble.members, first)]
    assert min(moved) > 1e-3, f"the members trained 3 more steps: {moved}"


def test_a_resumed_fit_lists_the_sync_rounds_of_the_fit_it_resumed(tmp_path):
    """Before: `strategy.sync_history` of the resumed fit held its own rounds only ([1] here, against [0, 1])."""
    strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **FIT, callbacks=[ModelCheckpoint(tmp_path, save_last=True)], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match=f"failed at step {FAIL_AT}"):
        trainer.fit(FailsAtStep(fail_at=FAIL_AT), train_loader())
    assert [r.round for r in strategy.sync_history] == [0]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", seed=SEED)
    quiet_trainer(strategy=strategy, **FIT).fit(FailsAtStep(), train_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert [r.round for r in strategy.sync_history] == [0, 1]
    assert strategy.sync_history[0].members == [0, 1, 2]


def test_resuming_from_a_plain_checkpoint_says_the_members_start_as_copies(tmp_path):
    """Before: silently (every member loads the one state, so independent initialisation is lost)."""
    plain = quiet_trainer(**FIT)
    plain.fit(FailsAtStep(), train_loader())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, sync="none", seed=SEED), **{**FIT, "max_epochs": 3})
    with pytest.warns(UserWarning, match="is a plain Lightning checkpoint .* the members start as copies"):
        trainer.fit(FailsAtStep(), train_loader(), ckpt_path=tmp_path / "plain.ckpt")


class Wider(FailsAtStep):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[0] = torch.nn.Linear(64, 48)
        self.net[-1] = torch.nn.Linear(48, 10)


def test_resuming_into_a_module_of_other_shapes_names_the_entries(tmp_path):
    """Before: `The size of tensor a (48) must match the size of tensor b (32)`, naming nothing."""
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, sync="none", seed=SEED), **FIT)
    trainer.fit(FailsAtStep(), train_loader())
    trainer.save_checkpoint(tmp_path / "ensemble.ckpt")
    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **{**FIT, "max_epochs": 3})
    with pytest.raises(RuntimeError, match=r"size mismatch for net\.0\.weight: copying a param with shape \(32, 64\), the shape in the current model is \(48, 64\)"):
        trainer.fit(Wider(), train_loader(), ckpt_path=tmp_path / "ensemble.ckpt")
    assert strategy.ensemble is None, "a fit that failed before its first step leaves no members of its own"
