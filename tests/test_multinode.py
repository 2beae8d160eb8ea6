"""Multi-node behaviour on Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``:
several real raylets on this machine): members spread over nodes, a member whose node is removed
mid-fit restarts on another node, and losing the only node that can host members fails the fit
saying so; on a single machine, the death of the Ray instance's raylet fails the fit saying so.

A ``Cluster`` cannot share a process with the session's local Ray instance, so each scenario runs
in a fresh process (``spawn``) that starts the cluster, fits and shuts the cluster down again.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

SCENARIO_TIMEOUT_S = 600
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
#: the digits data module the tests wrap (``tests/models.py`` imports it from here)
EXAMPLES_DIR = os.path.join(os.path.dirname(TESTS_DIR), "examples")


class ScenarioProcessDied(RuntimeError):
    """The scenario's process ended without a result (Ray's core worker may end its driver process itself)."""


def _report(results: Any, scenario: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In the scenario's process: runs ``scenario`` and hands its result, or the exception it raised, to the test."""
    try:
        results.put((True, scenario(*args)))
    except BaseException as err:  # handed to the test, which raises it
        try:
            pickle.dumps(err)
        except Exception:  # not picklable: its text
            err = RuntimeError(f"{type(err).__name__}: {err}")
        results.put((False, err))


def _in_fresh_process(scenario: Callable[..., Any], *args: Any) -> Any:
    """Runs ``scenario`` in a new process whose raylets (started by ``Cluster``) import these tests' modules.

    Raises ``ScenarioProcessDied`` as soon as that process ends without a result, rather than
    waiting out ``SCENARIO_TIMEOUT_S``.
    """
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys([TESTS_DIR, EXAMPLES_DIR, *(previous or "").split(os.pathsep)]) if p)
    context = get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_report, args=(results, scenario, args), daemon=True)
    process.start()
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    try:
        while True:
            try:
                succeeded, value = results.get(timeout=1)
                break
            except queue.Empty:
                if not process.is_alive():
                    try:  # a result written just before the process ended
                        succeeded, value = results.get(timeout=5)
                        break
                    except queue.Empty:
                        raise ScenarioProcessDied(f"the scenario's process ended (exit code {process.exitcode}) without a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the scenario did not end within {SCENARIO_TIMEOUT_S} s") from None
    finally:
        process.terminate()  # a scenario that hangs is stopped with its process (Ray's reaper stops its raylets)
        process.join(30)
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    if not succeeded:
        raise value
    return value


class BlockAfterMarker(pl.Callback):
    """Member ``member`` touches ``marker`` at the start of epoch 1 and then waits there (until its node
    is removed), once: a restarted member finds the marker and trains on."""

    def __init__(self, marker: str, member: int = 1) -> None:
        self.marker, self.member = marker, member

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.strategy.member_index != self.member or trainer.current_epoch != 1 or os.path.exists(self.marker):
            return
        Path(self.marker).touch()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.1)


def _fit_in_thread(strategy, callbacks, root: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Fits 2 epochs of digits in a thread (the cluster is changed from the main thread meanwhile)."""
    from models import DigitsDataModule, DigitsModule

    outcome: dict[str, Any] = {}
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=callbacks, default_root_dir=root,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )

    def run() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
                outcome["epoch"] = trainer.current_epoch
            except Exception as err:  # handed to the test
                outcome["error"] = f"{type(err).__name__}: {err}"
        outcome["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def _node_removed_mid_fit(root: str, worker_cpus: list[int]) -> dict[str, Any]:
    """2 members on a cluster of a CPU-less head and workers with ``worker_cpus``; the node of member 1
    is removed while member 1 waits at the start of epoch 1."""
    import ray
    from ray.cluster_utils import Cluster

    from hqde_lightning import HQDEStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = {cluster.add_node(num_cpus=cpus).node_id: None for cpus in worker_cpus}
        nodes = {node.node_id: node for node in cluster.worker_nodes}
        # one actor per member: the callback blocks member 1's own process
        strategy = HQDEStrategy(num_members=2, sync="elastic", seed=0, ray_address=cluster.address, member_start_timeout_s=120, members_per_worker=1)
        marker = os.path.join(root, "member_1_waits")
        thread, outcome = _fit_in_thread(strategy, [BlockAfterMarker(marker)], root)
        launcher = strategy._launcher
        _wait_for(lambda: os.path.exists(marker) and {0, 1} <= set(launcher.member_nodes), "member 1 to reach epoch 1")
        first_nodes = dict(launcher.member_nodes)
        cluster.remove_node(nodes[first_nodes[1]])
        thread.join(SCENARIO_TIMEOUT_S)
        outcome.update(first_nodes=first_nodes, final_nodes=dict(launcher.member_nodes), workers=list(workers))
        return outcome
    finally:
        ray.shutdown()
        cluster.shutdown()


def _spread(root: str) -> dict[str, Any]:
    """2 members asking for 1 CPU each on a CPU-less head and two workers of 2 CPUs (both fit on one)."""
    import ray
    from models import DigitsDataModule, DigitsModule
    from ray.cluster_utils import Cluster

    from hqde_lightning import HQDEStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=2).node_id for _ in range(2)]
        strategy = HQDEStrategy(num_members=2, sync="elastic", seed=0, ray_address=cluster.address, resources_per_member={"num_cpus": 1})
        trainer = pl.Trainer(
            strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=1, default_root_dir=root,
            logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
        return {"nodes": dict(strategy._launcher.member_nodes), "workers": workers, "epoch": trainer.current_epoch}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _groups_per_node(root: str) -> dict[str, Any]:
    """4 members with ``members_per_worker="auto"`` on a CPU-less head and two workers of 2 CPUs: one group actor per worker."""
    import ray
    from models import DigitsDataModule, DigitsModule
    from ray.cluster_utils import Cluster

    from hqde_lightning import HQDEStrategy

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=2).node_id for _ in range(2)]
        strategy = HQDEStrategy(num_members=4, sync="elastic", seed=0, ray_address=cluster.address)
        trainer = pl.Trainer(
            strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=1, default_root_dir=root,
            logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
        rounds = [record.members for record in strategy.sync_history]
        return {"nodes": dict(strategy._launcher.member_nodes), "workers": workers, "epoch": trainer.current_epoch, "rounds": rounds}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_member_groups_one_actor_per_node(tmp_path):
    result = _in_fresh_process(_groups_per_node, str(tmp_path))
    assert result["epoch"] == 1 and result["rounds"] == [[0, 1, 2, 3]]
    nodes = result["nodes"]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and {nodes[0], nodes[2]} == set(result["workers"]), "members 0-1 on one worker, 2-3 on the other"


def test_members_spread_over_nodes(tmp_path):
    result = _in_fresh_process(_spread, str(tmp_path))
    assert result["epoch"] == 1
    assert sorted(result["nodes"].values()) == sorted(result["workers"]), "one member on each worker node"


def test_member_of_a_removed_node_restarts_on_another_node(tmp_path):
    result = _in_fresh_process(_node_removed_mid_fit, str(tmp_path), [1, 1, 1])
    assert "error" not in result, result["error"]
    assert result["epoch"] == 2, "the fit finished"
    first, final = result["first_nodes"], result["final_nodes"]
    assert first[0] != first[1] and set(first.values()) <= set(result["workers"])
    assert final[0] == first[0], "member 0 stayed where it was"
    assert final[1] not in (first[0], first[1]) and final[1] in result["workers"], "member 1 moved to the idle node"
    assert any("left the cluster; member 1 restarts on another node" in w for w in result["warnings"])


def test_losing_the_only_node_that_hosts_members_fails_saying_so(tmp_path):
    result = _in_fresh_process(_node_removed_mid_fit, str(tmp_path), [2])
    assert "epoch" not in result
    assert "was lost with its Ray node" in result["error"] and "no alive node can host it" in result["error"], result["error"]


class KillRaylet(pl.Callback):
    """Member 0 kills the raylet of the Ray instance the package started (its own parent process) at epoch 1."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.strategy.member_index != 0 or trainer.current_epoch != 1:
            return
        import psutil

        raylet = psutil.Process(os.getppid())
        assert raylet.name() == "raylet", raylet.name()
        raylet.kill()
        time.sleep(60)


def _raylet_dies(root: str) -> dict[str, Any]:
    """A fit on the Ray instance the package starts itself (``ray_address=None``) whose raylet dies mid-fit."""
    from hqde_lightning import HQDEStrategy

    thread, outcome = _fit_in_thread(HQDEStrategy(num_members=2, seed=0, members_per_worker=1), [KillRaylet()], root)
    thread.join(SCENARIO_TIMEOUT_S)
    return outcome


def test_local_raylet_death_fails_saying_ray_stopped(tmp_path):
    # Once the raylet is dead, Ray's core worker ends the driver's process itself ("The connection to the
    # plasma store is failed. Terminate the process.") whenever it next touches the object store; in about one
    # run in thirty that came before the fit could fail. That is Ray's doing, so such a run is tried once more.
    try:
        result = _in_fresh_process(_raylet_dies, str(tmp_path / "first"))
    except ScenarioProcessDied:
        result = _in_fresh_process(_raylet_dies, str(tmp_path / "second"))
    assert "epoch" not in result
    assert "Ray itself stopped (its raylet died)" in result["error"], result["error"]
