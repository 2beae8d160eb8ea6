"""Checkpoints that resume and load, a writer that outlives member 0, safe loading, file modes and damage.

Every test here works on checkpoints written by real fits of real members on bundled digits.
"""

from __future__ import annotations

import fractions
import glob
import os
import random
import signal
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import DigitsDataModule, DigitsModule

from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.callbacks import AdaptiveQuantization, QuantumNoise
from hqde_lightning.checkpoint import HQDE_KEY, AtomicCheckpointIO, load_checkpoint_file
from hqde_lightning.member import MEMBER_KEY

import hqde_lightning

# the folder the package under test is imported from (for the writer subprocesses)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(hqde_lightning.__file__)))


def _trainer(strategy: HQDEStrategy, root, **kwargs) -> pl.Trainer:
    defaults = dict(strategy=strategy, default_root_dir=str(root), logger=False, enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture(scope="module")
def robust_fit(ray_session, tmp_path_factory):
    """3 members as actors, elastic sync with the Byzantine defence, quantized sync, noise; checkpoints every 5 steps.

    Member actors: these tests are about what the writing member puts into checkpoints for the
    others (their latest snapshots); a member group holds every member itself (tests/test_groups.py).
    """
    root = tmp_path_factory.mktemp("robust")
    checkpoints = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=5, save_top_k=-1)
    strategy = HQDEStrategy(num_members=3, sync="elastic", outlier_threshold=3.0, seed=5, members_per_worker=1)
    callbacks = [checkpoints, AdaptiveQuantization(), QuantumNoise(scale=1e-3)]
    trainer = _trainer(strategy, root, max_epochs=2, callbacks=callbacks)
    model, dm = DigitsModule(), DigitsDataModule()
    trainer.fit(model, datamodule=dm)
    dm.setup("test")
    driver_path = str(root / "driver.ckpt")
    trainer.save_checkpoint(driver_path)
    return trainer, strategy, model, dm, root, driver_path


# ------------------------------------------------------------------ A5: resume and load


def test_checkpoint_written_in_the_first_epoch_loads_every_member(robust_fit):
    _, strategy, _, dm, root, _ = robust_fit
    early = str(root / "ckpt" / "epoch=0-step=5.ckpt")
    section = load_checkpoint_file(early)[HQDE_KEY]
    # every entry is that member's own full state: the writer's at step 5, the others' from their start
    assert [m[MEMBER_KEY]["index"] for m in section["members"]] == [0, 1, 2]
    assert all("pytorch-lightning_version" in m for m in section["members"])
    assert [m["global_step"] for m in section["members"]] == [5, 0, 0]
    ensemble = Ensemble.load_from_checkpoint(early, DigitsModule)
    assert ensemble.num_members == 3 and ensemble.active_indices() == [0, 1, 2]
    for member, entry in zip(ensemble.members, section["members"]):
        torch.testing.assert_close(member.net[0].weight, entry["state_dict"]["net.0.weight"])
    assert ensemble.predict_proba(dm.test.tensors[0][:8]).shape == (8, 10)


def test_driver_checkpoint_after_fit_loads_as_the_ensemble(robust_fit):
    _, strategy, _, dm, _, driver_path = robust_fit
    loaded = Ensemble.load_from_checkpoint(driver_path, DigitsModule)
    x = dm.test.tensors[0][:64]
    torch.testing.assert_close(loaded.predict_proba(x), strategy.ensemble.predict_proba(x))


class RecordStart(pl.Callback):
    """Writes what each member starts training from (epoch, step, weights, optimizer state) to ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module):
        record = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
        }
        torch.save(record, os.path.join(self.folder, f"member_{trainer.strategy.member_index}.pt"))


def test_resume_after_driver_save_continues_each_member(ray_session, tmp_path):
    # member actors: `RecordStart` reads `trainer.optimizers`, which in a member group is the stacked optimizer
    strategy = HQDEStrategy(num_members=2, sync="none", seed=9, members_per_worker=1)
    trainer = _trainer(strategy, tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    path = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(path)
    saved = load_checkpoint_file(path)[HQDE_KEY]["members"]

    resumed = HQDEStrategy(num_members=2, sync="none", seed=9, members_per_worker=1)
    trainer = _trainer(resumed, tmp_path, max_epochs=2, enable_checkpointing=False, callbacks=[RecordStart(str(tmp_path))])
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=path)
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * 19
    for index, entry in enumerate(saved):
        start = torch.load(tmp_path / f"member_{index}.pt", weights_only=True)
        assert (start["epoch"], start["global_step"]) == (1, 19), "the member's loops continue after its first epoch"
        for key, value in entry["state_dict"].items():
            torch.testing.assert_close(start["state_dict"][key], value, msg=f"member {index} starts from its own {key}")
        momentum = [s["momentum_buffer"] for s in start["optimizer"]["state"].values()]
        expected = [s["momentum_buffer"] for s in entry["optimizer_states"][0]["state"].values()]
        assert len(momentum) == len(expected) > 0
        for got, want in zip(momentum, expected):
            torch.testing.assert_close(got, want, msg=f"member {index} keeps its own optimizer state")
        moved = float((resumed.ensemble.members[index].net[0].weight - entry["state_dict"]["net.0.weight"]).norm())
        assert moved > 0, "and trains one more epoch"

    # a file whose member entries hold weights only (as older versions wrote after fit) still resumes
    legacy = load_checkpoint_file(path)
    legacy[HQDE_KEY]["members"] = [{"state_dict": m["state_dict"]} for m in legacy[HQDE_KEY]["members"]]
    legacy_path = str(tmp_path / "weights_only_entries.ckpt")
    torch.save(legacy, legacy_path)
    trainer = _trainer(HQDEStrategy(num_members=2, sync="none", seed=9, members_per_worker=1), tmp_path, max_epochs=2, enable_checkpointing=False, callbacks=[RecordStart(str(tmp_path))])
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=legacy_path)
    assert trainer.current_epoch == 2
    for index, entry in enumerate(saved):
        start = torch.load(tmp_path / f"member_{index}.pt", weights_only=True)
        assert start["epoch"] == 1
        torch.testing.assert_close(start["state_dict"]["net.0.weight"], entry["state_dict"]["net.0.weight"])


def test_step_checkpoint_in_the_first_resumed_epoch_holds_every_member(robust_fit, tmp_path):
    """Resumed member actors post their starting state, so a mid-epoch save before any sync of the new run does not wait for one."""
    driver_path = robust_fit[-1]  # written after 2 epochs
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5, save_top_k=-1)
    strategy = HQDEStrategy(num_members=3, sync="elastic", outlier_threshold=3.0, seed=5, members_per_worker=1)
    trainer = _trainer(strategy, tmp_path, max_epochs=3, callbacks=[checkpoints, AdaptiveQuantization(), QuantumNoise(scale=1e-3)])
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=driver_path)
    assert trainer.current_epoch == 3
    section = load_checkpoint_file(str(tmp_path / "ckpt" / "epoch=2-step=40.ckpt"))[HQDE_KEY]
    assert [m["global_step"] for m in section["members"]] == [40, 38, 38]
    assert Ensemble.load_from_checkpoint(str(tmp_path / "ckpt" / "epoch=2-step=40.ckpt"), DigitsModule).num_members == 3


# ------------------------------------------------------------------ B10: the writer role moves


class StopMember(pl.Callback):
    """Stops member ``member``'s fit at the end of epoch ``epoch`` (as early stopping would)."""

    def __init__(self, member: int = 0, epoch: int = 0) -> None:
        self.member, self.epoch = member, epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.strategy.member_index == self.member and trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_checkpoints_continue_after_member_zero_stops(ray_session, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, save_last=True)
    strategy = HQDEStrategy(num_members=2, sync="elastic", seed=3)
    trainer = _trainer(strategy, tmp_path, max_epochs=3, callbacks=[checkpoints, StopMember()])
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    written = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "ckpt" / "epoch=*.ckpt")))
    assert written == ["epoch=0-step=19.ckpt", "epoch=1-step=38.ckpt", "epoch=2-step=57.ckpt"]
    last = load_checkpoint_file(str(tmp_path / "ckpt" / "epoch=2-step=57.ckpt"))
    members = last[HQDE_KEY]["members"]
    assert [m[MEMBER_KEY]["round"] for m in members] == [0, 2], "member 0 as it stopped, member 1 at epoch 2"
    assert last["epoch"] == 2
    # the driver's checkpoint callback reports what the last writer wrote
    assert trainer.current_epoch == 3
    assert os.path.isfile(trainer.checkpoint_callback.last_model_path)
    assert load_checkpoint_file(trainer.checkpoint_callback.last_model_path)["epoch"] == 2


# ------------------------------------------------------------------ C13: safe loading


class _CreatesFile:
    """Unpickling this object creates ``path``: a stand-in for code a crafted checkpoint would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_genuine_checkpoints_load_with_weights_only(robust_fit):
    _, strategy, _, _, root, driver_path = robust_fit
    paths = sorted(glob.glob(str(root / "ckpt" / "*.ckpt"))) + [driver_path]
    assert len(paths) >= 6
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        section = checkpoint[HQDE_KEY]
        assert section["coordinator"]["aggregator"]["reputation"] is not None or checkpoint["epoch"] == 0
    saved = torch.load(driver_path, weights_only=True)
    callbacks = saved[HQDE_KEY]["members"][1]["callbacks"]
    assert any("AdaptiveQuantization" in key and state["residuals"] for key, state in callbacks.items())
    assert any("QuantumNoise" in key and state for key, state in callbacks.items())
    assert saved[HQDE_KEY]["coordinator"]["history"], "the sync history is saved"


def test_crafted_checkpoint_is_refused_everywhere(robust_fit, tmp_path):
    trainer, _, model, dm, _, driver_path = robust_fit
    marker = tmp_path / "code_ran"
    crafted = load_checkpoint_file(driver_path)
    crafted["hyper_parameters"]["payload"] = _CreatesFile(str(marker))
    path = str(tmp_path / "crafted.ckpt")
    torch.save(crafted, path)

    with pytest.raises(Exception, match="crafted.ckpt was not loaded: it holds `[a-z.]*open`.*weights_only=False"):
        Ensemble.load_from_checkpoint(path, DigitsModule)
    for weights_only in (None, True):
        fresh = _trainer(HQDEStrategy(num_members=3, seed=5), tmp_path, max_epochs=3)
        with pytest.raises(Exception, match="crafted.ckpt was not loaded"):
            fresh.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=path, weights_only=weights_only)
    with pytest.raises(Exception, match="crafted.ckpt was not loaded"):
        trainer.test(model, datamodule=dm, ckpt_path=path, verbose=False)
    assert not marker.exists(), "no code from the checkpoint may run"


def test_explicit_weights_only_false_is_honoured(robust_fit, tmp_path):
    trainer, _, model, dm, _, driver_path = robust_fit
    custom = load_checkpoint_file(driver_path)
    custom["hyper_parameters"]["lr"] = fractions.Fraction(1, 20)  # a hyper-parameter of a type torch does not allowlist
    path = str(tmp_path / "custom_hparams.ckpt")
    torch.save(custom, path)
    with pytest.raises(Exception, match="fractions.Fraction.*weights_only=False"):
        Ensemble.load_from_checkpoint(path, DigitsModule)
    assert Ensemble.load_from_checkpoint(path, DigitsModule, weights_only=False).num_members == 3
    (results,) = trainer.test(model, datamodule=dm, ckpt_path=path, weights_only=False, verbose=False)
    assert results["ensemble/test_acc"] > 0.8


# ------------------------------------------------------------------ C15: damaged files


def test_damaged_files_name_the_file(robust_fit, tmp_path):
    _, _, _, _, _, driver_path = robust_fit
    data = open(driver_path, "rb").read()
    rng = random.Random(0)
    blobs = {
        "truncated_10": data[: len(data) // 10],
        "truncated_half": data[: len(data) // 2],
        "random": bytes(rng.getrandbits(8) for _ in range(4096)),
        "empty": b"",
        "text": b"not a checkpoint\n" * 50,
    }
    for name, blob in blobs.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(blob)
        with pytest.raises(RuntimeError, match=f"{name}.ckpt is damaged or is not a checkpoint"):
            load_checkpoint_file(path)
        with pytest.raises(RuntimeError, match=f"{name}.ckpt is damaged or is not a checkpoint"):
            Ensemble.load_from_checkpoint(str(path), DigitsModule)


def _flip_member_bytes(source: str, target: str, member: int) -> None:
    """Copies ``source`` to ``target`` with one byte flipped inside member ``member``'s first weight matrix."""
    checkpoint = load_checkpoint_file(source)
    weight = checkpoint[HQDE_KEY]["members"][member]["state_dict"]["net.0.weight"]
    data = bytearray(open(source, "rb").read())
    offset = bytes(data).find(weight.numpy().tobytes())
    assert offset >= 0, "the tensor's bytes are stored as they are"
    data[offset + 101] ^= 0x5A
    open(target, "wb").write(bytes(data))


def test_flipped_tensor_bytes_are_detected_on_every_load_path(robust_fit, tmp_path):
    trainer, _, model, dm, _, driver_path = robust_fit
    path = str(tmp_path / "flipped.ckpt")
    _flip_member_bytes(driver_path, path, member=1)
    assert torch.load(path, weights_only=True) is not None, "torch itself loads it silently"
    message = "flipped.ckpt is damaged: member 1's weights do not match the checksum"
    with pytest.raises(RuntimeError, match=message):
        load_checkpoint_file(path)
    with pytest.raises(RuntimeError, match=message):
        Ensemble.load_from_checkpoint(path, DigitsModule)
    with pytest.raises(RuntimeError, match=message):
        trainer.test(model, datamodule=dm, ckpt_path=path, verbose=False)
    fresh = _trainer(HQDEStrategy(num_members=3, seed=5), tmp_path, max_epochs=3)
    with pytest.raises(RuntimeError, match=message):
        fresh.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=path)


# ------------------------------------------------------------------ C14 and B11: file mode, stale temporary files


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_checkpoint_file_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(3)}, tmp_path / "atomic.ckpt")
        torch.save({"weights": torch.ones(3)}, tmp_path / "plain.pt")
    finally:
        os.umask(previous)
    mode = os.stat(tmp_path / "atomic.ckpt").st_mode & 0o777
    assert mode == 0o666 & ~umask == os.stat(tmp_path / "plain.pt").st_mode & 0o777


_SLOW_WRITER = """
import sys, time, torch
from hqde_lightning.checkpoint import AtomicCheckpointIO

class Slow:
    def __reduce__(self):
        time.sleep(120)
        return (int, (0,))

AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(3), "slow": Slow()}, sys.argv[1])
"""


def _start_slow_writer(target) -> subprocess.Popen:
    """A process that starts writing ``target`` and hangs mid-write (its temporary file exists)."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    process = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], env=env)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.1)
    return process


def test_temporary_file_of_a_killed_write_is_removed(tmp_path):
    target = tmp_path / "last.ckpt"
    killed = _start_slow_writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (stale,) = glob.glob(str(tmp_path / ".last.ckpt.*.tmp"))
    running = _start_slow_writer(tmp_path / "other.ckpt")  # a write still in progress keeps its file
    try:
        AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(3)}, tmp_path / "epoch=1.ckpt")
        assert not os.path.exists(stale), "the killed write's temporary file is removed at the next save"
        assert glob.glob(str(tmp_path / ".other.ckpt.*.tmp")), "a live writer's temporary file is left alone"
    finally:
        running.kill()
        running.wait()


class KillMemberOnce(pl.Callback):
    """Kills member ``member``'s actor at ``epoch``/``batch`` (once: a marker file remembers it)."""

    def __init__(self, marker: str, member: int = 0, epoch: int = 1, batch: int = 5) -> None:
        self.marker, self.member, self.epoch, self.batch = marker, member, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.strategy.member_index, trainer.current_epoch, batch_idx) != (self.member, self.epoch, self.batch) or os.path.exists(self.marker):
            return
        open(self.marker, "w").close()
        import ray

        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def test_checkpoints_continue_after_member_zero_is_given_up_on(ray_session, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)
    strategy = HQDEStrategy(num_members=2, sync="elastic", seed=3, max_member_restarts=0, on_member_failure="continue")
    trainer = _trainer(strategy, tmp_path, max_epochs=3, callbacks=[checkpoints, KillMemberOnce(str(tmp_path / "killed"))])
    with pytest.warns(UserWarning, match="continuing with the other members"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert strategy.dropped_members == [0]
    written = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "ckpt" / "epoch=*.ckpt")))
    assert written == ["epoch=0-step=19.ckpt", "epoch=1-step=38.ckpt", "epoch=2-step=57.ckpt"]
    members = load_checkpoint_file(str(tmp_path / "ckpt" / "epoch=2-step=57.ckpt"))[HQDE_KEY]["members"]
    assert [m[MEMBER_KEY]["round"] for m in members] == [0, 2], "member 0 as of its last epoch end, member 1 at epoch 2"
