"""Fault tolerance: a member whose actor dies is restarted (or dropped, or the fit fails cleanly)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import ray
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import DigitsDataModule, DigitsModule

from hqde_lightning import HQDEStrategy
from hqde_lightning.actors import Coordinator
from hqde_lightning.aggregation import resolve_aggregator
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.codec import payload_layout, payload_nbytes, state_to_numpy
from hqde_lightning.member import sync_state
from hqde_lightning.placement import NodeRecord, PlacementScorer
from hqde_lightning.topology import resolve_topology


class KillOnce(pl.Callback):
    """Kills member ``member``'s own actor (``ray.kill``) at ``epoch``/``batch``, once per marker file."""

    def __init__(self, marker: str, member: int = 1, epoch: int = 1, batch: int = 5) -> None:
        self.marker, self.member, self.epoch, self.batch = marker, member, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.strategy.member_index != self.member or trainer.current_epoch != self.epoch or batch_idx != self.batch:
            return
        if os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class KillAtSync(pl.Callback):
    """Kills member ``member`` (from a thread of its own actor) after it sent its epoch-``epoch`` weights,
    while it waits at the sync point; member ``late`` reaches that sync point only after the kill, so the
    round completes after the member that sent weights to it is dead."""

    def __init__(self, marker: str, member: int = 1, late: int = 2, epoch: int = 1) -> None:
        self.marker, self.member, self.late, self.epoch = marker, member, late, epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch != self.epoch or batch_idx != trainer.num_training_batches - 1 or os.path.exists(self.marker):
            return
        if trainer.strategy.member_index == self.member:
            sync, actor = trainer.strategy._member_sync, ray.get_runtime_context().current_actor

            def kill() -> None:
                while sync.synced_epoch != self.epoch:  # set just before the weights are sent
                    time.sleep(0.02)
                time.sleep(1.0)  # the sync call with the weights reaches the coordinator
                Path(self.marker).touch()
                ray.kill(actor, no_restart=True)

            threading.Thread(target=kill, daemon=True).start()
        elif trainer.strategy.member_index == self.late:
            deadline = time.monotonic() + 300
            while not os.path.exists(self.marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(3.0)  # the dead member's own objects are gone by now


class RecordResumePath(pl.Callback):
    """Writes the checkpoint path a restarted member resumed from into ``record``."""

    def __init__(self, record: str) -> None:
        self.record = record

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path:
            Path(self.record).write_text(str(trainer.ckpt_path))


def _fit(tmp_path, callbacks, **strategy_kwargs):
    """A 3-member fit of member actors (the callbacks kill a member's own actor)."""
    strategy = HQDEStrategy(num_members=3, sync="elastic", seed=4, members_per_worker=1, **strategy_kwargs)
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=3, callbacks=callbacks, default_root_dir=str(tmp_path),
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    return trainer, strategy


def test_killed_member_is_restarted_and_fit_finishes(ray_session, tmp_path):
    with pytest.warns(UserWarning, match="member 1's actor died .* restarting it"):
        trainer, strategy = _fit(tmp_path, [KillOnce(str(tmp_path / "killed")), RecordResumePath(str(tmp_path / "resumed"))])
    assert (tmp_path / "killed").exists(), "the member really was killed"
    resumed = Path((tmp_path / "resumed").read_text())
    assert resumed.parent.name.startswith("hqde-restart-")
    assert not resumed.parent.exists(), "the restart directory is removed when the restarted member's fit ends"
    assert trainer.current_epoch == 3
    assert strategy.ensemble.num_members == 3 and strategy.dropped_members == []
    assert len(strategy.sync_history) == 3 and all(h["members"] == [0, 1, 2] for h in strategy.sync_history)
    flats = [torch.cat([p.flatten() for p in m.parameters()]) for m in strategy.ensemble.members]
    assert min(float((a - b).norm()) for a, b in itertools.combinations(flats, 2)) > 1e-4
    (results,) = trainer.test(trainer.lightning_module, datamodule=DigitsDataModule(), verbose=False)
    assert results["member_1/test_acc"] > 0.85, "the restarted member is trained"


def test_member_killed_while_waiting_at_a_sync_is_restarted_and_the_round_completes(ray_session, tmp_path):
    with pytest.warns(UserWarning, match="member 1's actor died .* restarting it"):
        trainer, strategy = _fit(tmp_path, [KillAtSync(str(tmp_path / "killed"))])
    assert (tmp_path / "killed").exists(), "the member really was killed at the sync point"
    assert trainer.current_epoch == 3
    assert strategy.ensemble.num_members == 3 and strategy.dropped_members == []
    assert [h["members"] for h in strategy.sync_history] == [[0, 1, 2]] * 3


def test_member_killed_while_waiting_at_a_sync_is_dropped_and_the_round_completes(ray_session, tmp_path):
    with pytest.warns(UserWarning, match="continuing with the other members"):
        trainer, strategy = _fit(tmp_path, [KillAtSync(str(tmp_path / "killed"))], max_member_restarts=0, on_member_failure="continue")
    assert trainer.current_epoch == 3 and strategy.dropped_members == [1]
    assert len(strategy.sync_history) == 3 and strategy.sync_history[-1]["members"] == [0, 2]


def test_coordinator_memory_does_not_grow_with_rounds(ray_session):
    class CountingCoordinator(Coordinator):  # defined here so that Ray ships it to the actor by value
        def references(self) -> int:
            """How many objects this process's reference table holds (owned or borrowed)."""
            return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())

    coordinator = ray.remote(CountingCoordinator).options(num_cpus=0).remote(2, resolve_aggregator("mean"), resolve_topology("flat"))
    weights = state_to_numpy(sync_state(DigitsModule(hidden=512)))  # > 100 kB: in the shared object store
    counts = []
    for round_id in range(8):
        calls = [coordinator.sync.remote(m, round_id, weights, payload_nbytes(weights), payload_layout(weights), None, 10) for m in range(2)]
        for (consensus,) in ray.get(calls):
            assert set(ray.get(consensus)) == set(weights)  # every member reads the consensus, then drops it
        del calls, consensus
        deadline = time.monotonic() + 10
        while True:  # members' releases reach the owner asynchronously
            count = ray.get(coordinator.references.remote())
            if not counts or count <= counts[0] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        counts.append(count)
    assert counts[-1] <= counts[0], f"objects held by the coordinator after each round: {counts}"
    # a restarted member redoing the last round gets that round's consensus at once
    (late,) = ray.get(coordinator.sync.remote(1, 7, weights, payload_nbytes(weights), payload_layout(weights), None, 10), timeout=30)
    assert set(ray.get(late)) == set(weights)
    ray.kill(coordinator)


def test_member_dropped_when_restarts_run_out_and_continue_is_chosen(ray_session, tmp_path):
    with pytest.warns(UserWarning, match="continuing with the other members"):
        trainer, strategy = _fit(tmp_path, [KillOnce(str(tmp_path / "killed"))], max_member_restarts=0, on_member_failure="continue")
    assert strategy.dropped_members == [1]
    assert strategy.ensemble.num_members == 2
    assert trainer.current_epoch == 3
    assert [h["members"] for h in strategy.sync_history][-1] == [0, 2]


def test_fit_fails_cleanly_with_checkpoint_intact(ray_session, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    # killed in epoch 2: member 0 cannot pass the epoch-1 sync before writing epoch 0's checkpoint
    with pytest.raises(RuntimeError, match="more than `max_member_restarts=0`"):
        _fit(tmp_path, [KillOnce(str(tmp_path / "killed"), epoch=2), checkpoint], max_member_restarts=0)
    saved = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")  # complete and loadable
    assert saved["epoch"] in (0, 1) and len(saved[HQDE_KEY]["members"]) == 3
    assert all(m["state_dict"] for m in saved[HQDE_KEY]["members"])


def test_placement_score_weights():
    good = NodeRecord("good", cpus=8, successes=9, failures=0, speed=100.0)
    flaky = NodeRecord("flaky", cpus=8, successes=1, failures=8, speed=100.0)
    scorer = PlacementScorer([flaky, good])
    request = {"num_cpus": 2}
    assert scorer.score(good, request) == pytest.approx(0.4 * 10 / 11 + 0.3 * 1.0 + 0.2 * 1.0 + 0.1)
    assert scorer.rank(request) == ["good", "flaky"]


def test_placement_spreads_load_and_prefers_capable_fast_nodes():
    a, b = NodeRecord("a", cpus=4), NodeRecord("b", cpus=4)
    scorer = PlacementScorer([a, b])
    chosen = [scorer.place({"num_cpus": 2}) for _ in range(4)]
    assert sorted(chosen) == ["a", "a", "b", "b"], "equal nodes share the members"
    gpu = PlacementScorer([NodeRecord("cpu-only", cpus=8), NodeRecord("gpu", cpus=8, gpus=1)])
    assert gpu.rank({"num_cpus": 1, "num_gpus": 1})[0] == "gpu"
    fast = PlacementScorer([NodeRecord("slow", cpus=8), NodeRecord("fast", cpus=8)])
    fast.record_speed("slow", 50.0)
    fast.record_speed("fast", 200.0)
    assert fast.rank({"num_cpus": 1})[0] == "fast"
    scorer.release("a", {"num_cpus": 2}, succeeded=False)
    assert a.failures == 1 and a.cpus_used == 2.0


def test_bad_fault_arguments():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="max_member_restarts"):
        HQDEStrategy(max_member_restarts=-1)
    with pytest.raises(MisconfigurationException, match="on_member_failure"):
        HQDEStrategy(on_member_failure="retry")


def test_member_speed_is_measured_from_progress_reports():
    import time
    from types import SimpleNamespace

    from hqde_lightning.events import ProgressEvent
    from hqde_lightning.forwarder import EventForwarder
    from hqde_lightning.progress import EnsembleProgress

    forwarder = EventForwarder(trainer=SimpleNamespace(loggers=[]), strategy=None, progress=EnsembleProgress(1, enabled=False))
    forwarder.handle([ProgressEvent(member=0, epoch=0, batch=2, total=10, loss=0.5)])
    time.sleep(0.05)
    forwarder.handle([ProgressEvent(member=0, epoch=1, batch=2, total=10, loss=0.4)])  # 10 more batches
    assert 0 < forwarder.batches_per_second[0] <= 10 / 0.05
    forwarder.forget(0)
    forwarder.handle([ProgressEvent(member=0, epoch=0, batch=1, total=10, loss=0.5)])  # a restarted member starts counting again
    assert forwarder._first_report[0][1] == 1


def test_a_final_snapshot_without_new_steps_does_not_replace_the_epoch_end_one():
    """A writer pairing round 0 gets the member's epoch-end snapshot whether or not the member's fit-end snapshot arrived first
    (their loops differ: resuming from them would give the member different data orders); the driver gets the final one."""
    import asyncio

    coordinator = Coordinator(2, resolve_aggregator("mean"), resolve_topology("flat"), check_clones=False)
    epoch_end = {"global_step": 19, "loops": "epoch end", "state_dict": {}}
    coordinator.post_snapshot(1, 0, epoch_end)
    coordinator.post_snapshot(1, 0, {"global_step": 19, "loops": "fit ended", "state_dict": {}}, final=True)
    assert asyncio.run(coordinator.snapshots_at(0, [0]))[1]["loops"] == "epoch end"
    assert coordinator.latest_snapshot(1)["loops"] == "epoch end"
    assert coordinator.latest_snapshots()[1]["loops"] == "fit ended" and 1 in coordinator.done
    coordinator.post_snapshot(0, 0, {"global_step": 19, "loops": "epoch end", "state_dict": {}})
    coordinator.post_snapshot(0, 0, {"global_step": 23, "loops": "stopped mid-epoch", "state_dict": {}}, final=True)
    assert coordinator.latest_snapshot(0)["loops"] == "stopped mid-epoch", "steps trained after the epoch end count"


def test_the_writer_of_an_epoch_waits_for_a_lower_member_that_may_still_stop_before_it():
    """Member 0 posted its snapshot of epoch 2's end, and its early stopping (checked at that epoch's end) has not said
    yet whether it trains epoch 3. Before, a faster member 1 asking then was told member 0 writes epoch 3's checkpoints,
    and skipped the save it was making; now it is told once member 0 starts epoch 3 or says it stops."""
    from hqde_lightning.turns import InProcessActor

    def asking_after(tell) -> bool:
        coordinator = InProcessActor(Coordinator(2, resolve_aggregator("mean"), resolve_topology("flat"), check_clones=False, in_process=True))
        for member in range(2):
            coordinator.post_snapshot.remote(member, 2, {"global_step": 30, "state_dict": {}}).result()
        writes = coordinator.is_writer.remote(1, 3)
        time.sleep(0.3)
        assert not writes.done(), "member 0 may still train epoch 3, or stop before it"
        tell(coordinator)
        return writes.result(timeout=10)

    assert asking_after(lambda c: c.stops_after.remote(0, 2)), "member 0 stopped: member 1 writes epoch 3's checkpoints"
    assert not asking_after(lambda c: c.starts_epoch.remote(0, 3)), "member 0 trains epoch 3: it writes them"


def test_a_group_actor_that_stops_early_hands_the_writer_role_on_for_every_member_it_trains():
    """A group actor of members 0 and 1 whose fit stops after epoch 2 (both stopped early) still saves that epoch's
    checkpoint when the actor of members 2 and 3 asks whether it writes epoch 3's. Before, only member 0's stop was
    announced: member 1 counted as a lower member still training, and epoch 3's checkpoints were not written."""
    from types import SimpleNamespace

    from hqde_lightning.turns import InProcessActor
    from hqde_lightning.worker_strategy import CheckpointWriter

    coordinator = InProcessActor(Coordinator(4, resolve_aggregator("mean"), resolve_topology("flat"), check_clones=False, in_process=True))

    def strategy(epoch: int, should_stop: bool) -> SimpleNamespace:
        trainer = SimpleNamespace(current_epoch=epoch, should_stop=should_stop, fit_loop=SimpleNamespace(_can_stop_early=True))
        return SimpleNamespace(lightning_module=SimpleNamespace(_trainer=trainer))

    for member in range(4):  # every member's snapshot of epoch 2's end
        coordinator.post_snapshot.remote(member, 2, {"global_step": 30, "state_dict": {}}).result()
    assert CheckpointWriter(coordinator, [0, 1]).holds(strategy(2, should_stop=True))  # saving its last epoch's checkpoint
    writes = coordinator.is_writer.remote(2, 3)
    assert writes.result(timeout=10), "the next group writes epoch 3's checkpoints"
