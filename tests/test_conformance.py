"""Lightning conformance: loggers see what a plain run logs, package metrics stay prefixed, the member's fit
runs through Lightning's own entry point, and Ctrl-C at any moment of a fit leaves no process it started running.

Real fits of 2 members on the bundled digits (1,200 training images in batches of 64: 19 steps per epoch), without
validation: the sync of an epoch then comes before any of that epoch's end-of-epoch rows reach the driver.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import lightning.pytorch as pl
import psutil
import pytest
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import DigitsDataModule, DigitsModule, quiet_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from hqde_lightning import HQDEStrategy

EPOCHS = 2
#: the step of each epoch's end-of-epoch rows in a plain run (19 steps per epoch)
EPOCH_END_STEPS = [18, 37]
WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class KeysSeen(Callback):
    """Records, inside the member, every metric name the user's callbacks could monitor (its state comes back to the driver)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keys |= set(trainer.callback_metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keys |= set(trainer.callback_metrics)

    def state_dict(self) -> dict:
        return {"keys": sorted(self.keys)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.keys = set(state_dict["keys"])


class LoggerSeen(Callback):
    """Records, inside the member, ``trainer.log_dir`` and what ``pl_module.logger.experiment`` gives (its state comes back)."""

    def __init__(self) -> None:
        self.log_dir: str | None = None
        self.experiment: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_dir = trainer.log_dir
        try:
            self.experiment = type(pl_module.logger.experiment).__name__
        except AttributeError as err:
            self.experiment = f"AttributeError: {err}"

    def state_dict(self) -> dict:
        return {"log_dir": self.log_dir, "experiment": self.experiment}

    def load_state_dict(self, state_dict: dict) -> None:
        self.log_dir, self.experiment = state_dict["log_dir"], state_dict["experiment"]


def _options(tmp_path, **kwargs) -> dict:
    options = dict(
        max_epochs=EPOCHS, limit_val_batches=0, default_root_dir=str(tmp_path), log_every_n_steps=5, enable_progress_bar=False, enable_model_summary=False
    )
    options.update(kwargs)
    return options


def _callbacks(tmp_path) -> list[Callback]:
    return [
        ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="train_loss_epoch", save_last=True),
        EarlyStopping(monitor="train_loss_epoch", patience=10),
        KeysSeen(),
        LoggerSeen(),
    ]


def _rows(log_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _steps(rows: list[dict[str, str]], column: str) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(column)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same fit without the strategy: what loggers and ``callback_metrics`` look like in a plain run."""
    tmp = tmp_path_factory.mktemp("plain")
    trainer = pl.Trainer(**_options(tmp, logger=CSVLogger(str(tmp), name="csv"), callbacks=_callbacks(tmp)))
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    return trainer


@pytest.fixture(scope="module")
def logged(ray_session, tmp_path_factory):
    """A 2-member elastic fit of member actors logging to a CSVLogger and a TensorBoardLogger."""
    tmp = tmp_path_factory.mktemp("logged")
    loggers = [CSVLogger(str(tmp), name="csv"), TensorBoardLogger(str(tmp), name="tb")]
    strategy = HQDEStrategy(num_members=2, sync="elastic", sync_strength=0.5, seed=3, members_per_worker=1)
    trainer = pl.Trainer(strategy=strategy, **_options(tmp, logger=loggers, callbacks=_callbacks(tmp)))
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    return trainer, strategy, tmp


def _seen(trainer: pl.Trainer) -> LoggerSeen:
    return next(cb for cb in trainer.callbacks if isinstance(cb, LoggerSeen))


def test_member_trainer_log_dir_is_the_plain_runs(logged, plain):
    """``trainer.log_dir`` inside a member actor is your first logger's ``log_dir``, as in a plain run (not its ``save_dir``)."""
    trainer, _, tmp = logged
    member, alone = _seen(trainer), _seen(plain)
    assert os.path.relpath(member.log_dir, tmp) == os.path.relpath(alone.log_dir, plain.default_root_dir) == os.path.join("csv", "version_0")
    assert member.log_dir == os.path.abspath(trainer.log_dir)
    # the experiment object lives in the driver: a member is told so, and what to use instead
    assert alone.experiment == "ExperimentWriter"
    assert member.experiment.startswith("AttributeError") and "stands in for your CSVLogger" in member.experiment and "`self.log(...)`" in member.experiment


def test_lightning_cli_trains_a_member_group_and_saves_its_config_where_a_plain_run_does(tmp_path, caplog):
    """``LightningCLI`` with the strategy in its YAML config: its ``SaveConfigCallback`` runs once for the group (it
    used to send every member to a thread of its own) and writes ``config.yaml`` into ``trainer.log_dir``."""
    strategy = {"class_path": "hqde_lightning.HQDEStrategy", "init_args": {"num_members": 2, "seed": 3, "aggregator": "geometric_median"}}
    trainer = {"max_epochs": 1, "limit_val_batches": 2, "enable_progress_bar": False, "default_root_dir": str(tmp_path), "strategy": strategy}
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"trainer": trainer}))
    with caplog.at_level(logging.INFO):
        cli = LightningCLI(DigitsModule, DigitsDataModule, args=["fit", "--config", str(config)])
    hqde = cli.trainer.strategy
    assert isinstance(hqde, HQDEStrategy) and hqde.num_members == 2 and len(hqde.ensemble.members) == 2
    assert "in a thread" not in caplog.text and "Ray" not in caplog.text
    assert float(cli.trainer.callback_metrics["member_1/val_acc"]) > 0.5
    saved = os.path.join(cli.trainer.log_dir, "config.yaml")
    assert cli.trainer.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    assert glob.glob(str(tmp_path / "**" / "config.yaml"), recursive=True) == [saved]
    with open(saved) as f:
        assert yaml.safe_load(f)["trainer"]["strategy"]["init_args"]["num_members"] == 2


# ----------------------------------------------------------------------------------------------- item 1
def test_csv_rows_have_plain_epoch_and_member_columns(logged, plain):
    trainer, _, _ = logged
    rows, plain_rows = _rows(trainer.loggers[0].log_dir), _rows(plain.logger.log_dir)
    plain_columns = set(plain_rows[0])
    columns = set(rows[0])
    assert {"step", "epoch"} <= columns
    for name in plain_columns - {"step", "epoch"}:
        assert {f"member_0/{name}", f"member_1/{name}"} <= columns, name
    # member 0 (the writer) carries Lightning's own epoch, at the same steps as the plain run
    epochs = {(r["step"], r["epoch"]) for r in rows if r["epoch"]}
    assert epochs == {(r["step"], r["epoch"]) for r in plain_rows if r["epoch"]}
    assert all(r["epoch"] == r["member_0/epoch"] for r in rows if r["member_0/epoch"])
    assert not any(r["epoch"] for r in rows if r["member_1/epoch"])


def test_sync_rows_at_the_step_of_their_epoch_end(logged, plain):
    trainer, strategy, _ = logged
    rows = _rows(trainer.loggers[0].log_dir)
    assert _steps(_rows(plain.logger.log_dir), "train_loss_epoch") == EPOCH_END_STEPS
    assert _steps(rows, "ensemble/sync_round") == EPOCH_END_STEPS
    assert [float(r["ensemble/sync_round"]) for r in rows if r["ensemble/sync_round"]] == [0.0, 1.0]
    assert _steps(rows, "member_0/train_loss_epoch") == EPOCH_END_STEPS
    for i in range(2):
        assert _steps(rows, f"member_{i}/hqde/distance_to_consensus") == EPOCH_END_STEPS
    assert [h["step"] for h in strategy.sync_history] == EPOCH_END_STEPS


def test_sync_rows_after_resume_continue_the_steps(logged, tmp_path):
    trainer, _, tmp = logged
    last = os.path.join(str(tmp / "ckpt"), "last.ckpt")
    logger = CSVLogger(str(tmp_path), name="resumed")
    resumed = pl.Trainer(strategy=HQDEStrategy(num_members=2, sync="elastic", sync_strength=0.5, seed=3, members_per_worker=1), **_options(tmp_path, max_epochs=EPOCHS + 1, logger=logger))
    resumed.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=last, weights_only=False)
    rows = _rows(logger.log_dir)
    assert _steps(rows, "ensemble/sync_round") == [56]
    assert [float(r["ensemble/sync_round"]) for r in rows if r["ensemble/sync_round"]] == [2.0]
    assert {r["epoch"] for r in rows if r["epoch"]} == {"2"}


# ----------------------------------------------------------------------------------------------- item 2
def test_package_metrics_stay_prefixed(logged, plain):
    trainer, _, _ = logged
    unprefixed = {k for k in trainer.callback_metrics if not k.startswith(("member_", "ensemble/"))}
    assert unprefixed == set(plain.callback_metrics)
    assert {f"member_{i}/hqde/distance_to_consensus" for i in range(2)} <= set(trainer.callback_metrics)
    # what the user's callbacks saw inside the members: the user's own metrics, as in the plain run
    seen = next(cb for cb in trainer.callbacks if isinstance(cb, KeysSeen)).keys
    assert seen == next(cb for cb in plain.callbacks if isinstance(cb, KeysSeen)).keys
    # the user's monitors work on the names they use without the strategy
    assert trainer.checkpoint_callback.best_model_score is not None and os.path.isfile(trainer.checkpoint_callback.best_model_path)
    assert trainer.early_stopping_callback.best_score.isfinite()


# ----------------------------------------------------------------------------------------------- item 3
def test_tensorboard_run_directory(logged):
    trainer, _, tmp = logged
    tb = trainer.loggers[1]
    event_files = glob.glob(os.path.join(str(tmp), "**", "events.out.tfevents.*"), recursive=True)
    assert event_files and {os.path.dirname(f) for f in event_files} == {tb.log_dir}
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch", "ensemble/sync_round", "ensemble/sync_seconds", "ensemble/sync_bytes", "ensemble/excluded_members"} <= tags
    for i in range(2):
        assert {f"member_{i}/train_loss_epoch", f"member_{i}/train_loss_step", f"member_{i}/hqde/distance_to_consensus"} <= tags
    assert [e.step for e in events.Scalars("ensemble/sync_round")] == EPOCH_END_STEPS
    assert [e.step for e in events.Scalars("member_1/train_loss_epoch")] == EPOCH_END_STEPS
    # hparams: the module's hyperparameters, in the same run directory
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert {k: v.number_value for k, v in start.hparams.items()} == {"hidden": 32, "lr": 0.05}
    with open(os.path.join(tb.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"hidden": 32, "lr": 0.05}


def test_a_member_group_writes_one_tensorboard_event_file_as_a_plain_fit_does(tmp_path):
    """A group in the driver logs to your TensorBoardLogger itself: the ensemble's own values logged after the fit go to
    the same event file (the group's fit had closed the writer, so they opened a second one)."""
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2, sync="none", seed=3), **_options(tmp_path, logger=tb, max_epochs=1))
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    event_files = glob.glob(os.path.join(str(tmp_path), "**", "events.out.tfevents.*"), recursive=True)
    assert [os.path.dirname(f) for f in event_files] == [tb.log_dir]
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert {"epoch", "member_0/train_loss_epoch", "member_1/train_loss_epoch", "ensemble/excluded_members"} <= set(events.Tags()["scalars"])


# ----------------------------------------------------------------------------------------------- item 5
class RecordException(Callback):
    """Appends ``pid, exception type, message`` to a file on ``on_exception`` (it runs in the members' processes too)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps([os.getpid(), type(exception).__name__, str(exception)]) + "\n")


class FailingModule(DigitsModule):
    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise self.error("raised by training_step at batch 2")
        return super().training_step(batch, batch_idx)


def _recorded(path: str) -> list[tuple[int, str, str]]:
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


def test_member_error_runs_on_exception_in_member_and_reaches_driver(ray_session, tmp_path):
    record = str(tmp_path / "exceptions.tsv")
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, members_per_worker=1), callbacks=[RecordException(record)], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^member \d failed: raised by training_step at batch 2$") as raised:
        trainer.fit(FailingModule(ValueError), datamodule=DigitsDataModule())
    assert type(raised.value) is ValueError, "your exception itself, not Ray's wrapper of it"
    assert "training_step" in str(raised.value.__cause__), "Ray's error, with the member's traceback, is its cause"
    assert trainer.interrupted
    failed = int(str(raised.value).split()[1])
    assert failed in trainer.strategy.ensemble.member_ids, "the members as the failed fit left them (before: no ensemble)"
    assert trainer.global_step == 2, "the furthest member's progress, as a plain fit's trainer keeps it (before: 0)"
    recorded = _recorded(record)
    in_members = [r for r in recorded if r[0] != os.getpid()]
    assert in_members and all(kind == "ValueError" and "raised by training_step at batch 2" in msg for _, kind, msg in in_members)
    # the driver's fit (its own `on_exception` included) sees the ValueError with the user's message
    assert any(pid == os.getpid() and kind == "ValueError" and msg.endswith("failed: raised by training_step at batch 2") for pid, kind, msg in recorded)


def test_keyboard_interrupt_in_member_ends_the_fit_as_a_plain_fit(ray_session, tmp_path):
    record = str(tmp_path / "exceptions.tsv")
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, members_per_worker=1), callbacks=[RecordException(record)], default_root_dir=str(tmp_path))
    handler = signal.getsignal(signal.SIGINT)
    try:
        # a plain fit answers KeyboardInterrupt with its graceful shutdown and `sys.exit(1)`
        with pytest.raises(SystemExit):
            trainer.fit(FailingModule(KeyboardInterrupt), datamodule=DigitsDataModule())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning's shutdown ignores further Ctrl-C
    assert trainer.interrupted
    in_members = [r for r in _recorded(record) if r[0] != os.getpid()]
    assert in_members and all(kind == "KeyboardInterrupt" for _, kind, _ in in_members)


# ----------------------------------------------------------------------------------------------- item 4
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from models import DigitsDataModule, DigitsModule
    from hqde_lightning import HQDEStrategy
    from hqde_lightning.aggregation import Mean

    MARKERS = sys.argv[1]


    def mark(name):
        open(os.path.join(MARKERS, name), "w").close()


    class MarkTraining(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                mark("training")


    class SlowMean(Mean):
        def __call__(self, *args, **kwargs):
            mark("sync")
            time.sleep(5)
            return super().__call__(*args, **kwargs)


    if __name__ == "__main__":
        trainer = pl.Trainer(
            strategy=HQDEStrategy(num_members=2, sync="elastic", aggregator=SlowMean(), members_per_worker=1), max_epochs=2, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[MarkTraining()],
        )
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    """
)


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _grandchildren(driver: psutil.Process, started: dict[int, psutil.Process]) -> bool:
    """Whether a process the driver started has started processes of its own (Ray's node starts its agents)."""
    try:
        return any(p.ppid() != driver.pid for p in started.values())
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()[:2])}"
    except psutil.Error:
        return str(proc.pid)


@pytest.mark.parametrize("moment", ["ray_start", "training", "sync"])
def test_ctrl_c_leaves_no_process_running(tmp_path, moment):
    """SIGINT to a fit's process while Ray starts, mid-training and during a sync: every process the fit started ends.

    Processes are told by their ids only: the descendants of the fit's process, collected while it runs.
    """
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([WORKTREE, os.path.join(WORKTREE, "tests")]))
    with open(tmp_path / "fit.log", "w") as log:
        fit = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stdout=log, stderr=subprocess.STDOUT)
    driver = psutil.Process(fit.pid)
    started: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and fit.poll() is None:
            started.update((p.pid, p) for p in _descendants(driver))
            if moment == "ray_start" and _grandchildren(driver, started):  # Ray's node is starting its own processes
                break
            if moment != "ray_start" and os.path.exists(tmp_path / moment):
                break
            time.sleep(0.05)
        assert fit.poll() is None, f"the fit ended before the {moment} moment: {(tmp_path / 'fit.log').read_text()[-3000:]}"
        fit.send_signal(signal.SIGINT)
        end = time.monotonic() + 90
        while fit.poll() is None and time.monotonic() < end:
            started.update((p.pid, p) for p in _descendants(driver))
            time.sleep(0.05)
        assert fit.poll() is not None, "the fit did not end within 90 s of Ctrl-C"
        end = time.monotonic() + 30
        while any(_alive(p) for p in started.values()) and time.monotonic() < end:
            time.sleep(0.5)
        survivors = {pid: p for pid, p in started.items() if _alive(p)}
        assert not survivors, f"still running 30 s after Ctrl-C ({moment}), of {len(started)} started: {[_describe(p) for p in survivors.values()]}"
    finally:
        for proc in [driver, *started.values()]:  # only processes this test started
            if _alive(proc):
                proc.kill()
