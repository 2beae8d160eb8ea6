"""Member resources: requests that fit no node fail at once, members that cannot start time out,
default shares pack, and the Ray instance the package starts listens on loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import ray
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule

from hqde_lightning import HQDEStrategy
from hqde_lightning.placement import NodeCapacity, check_members_fit, default_share, ray_resources

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)


def _trainer(strategy: HQDEStrategy, tmp_path) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy, max_epochs=1, limit_train_batches=3, default_root_dir=str(tmp_path),
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )


def test_request_larger_than_every_node_fails_at_trainer_time(ray_session, tmp_path):
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(MisconfigurationException, match=r"member 0 of 2 asks for 64 CPU .*no node is that large.*nodes offer: node \w+ \(.*\): " + f"{cpus:g} CPU, .* GiB memory"):
        _trainer(HQDEStrategy(num_members=2, resources_per_member={"num_cpus": 64}), tmp_path)


def test_members_that_do_not_fit_together_fail_naming_the_first_left_over(ray_session, tmp_path):
    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(MisconfigurationException, match=f"member {int(cpus)} of {int(cpus) + 1} asks for 1 CPU .*already fill the nodes"):
        _trainer(HQDEStrategy(num_members=int(cpus) + 1, resources_per_member={"num_cpus": 1}), tmp_path)


def test_member_waiting_for_held_resources_times_out(ray_session, tmp_path):
    cpus = ray.cluster_resources()["CPU"]

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(num_cpus=cpus).remote()  # another job holding every CPU
    ray.get(holder.ready.remote())
    try:
        trainer = _trainer(HQDEStrategy(num_members=2, member_start_timeout_s=2, members_per_worker=1), tmp_path)
        with pytest.raises(RuntimeError, match=r"member\(s\) \[0, 1\] asked for .* did not start within `member_start_timeout_s=2`.*free now"):
            trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    finally:
        ray.kill(holder)
    # the members that never started were removed with the failed fit: all CPUs come back
    trainer = _trainer(HQDEStrategy(num_members=2, sync="none", seed=0, members_per_worker=1), tmp_path)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert trainer.state.finished


@pytest.mark.parametrize("value", [0, -1, float("inf"), "60", True])
def test_bad_member_start_timeout(value):
    with pytest.raises(MisconfigurationException, match="member_start_timeout_s"):
        HQDEStrategy(member_start_timeout_s=value)


def test_default_shares_pack_onto_the_nodes():
    assert default_share([2.0], 3) == pytest.approx(0.6666)  # rounded down to Ray's 1e-4 step
    assert default_share([4.0, 1.0], 2) == 2.0  # the cluster-wide mean (2.5) fits one member only
    assert default_share([1.0, 1.0, 1.0], 3) == 1.0
    assert default_share([1.0, 1.0], 3) == 0.5
    nodes = [NodeCapacity("a", {"CPU": 4.0}), NodeCapacity("b", {"CPU": 1.0})]
    check_members_fit([ray_resources({"num_cpus": default_share([4.0, 1.0], 2)})] * 2, nodes)
    with pytest.raises(ValueError, match="member 1 of 2 asks for 2.5 CPU"):
        check_members_fit([ray_resources({"num_cpus": 2.5})] * 2, nodes)


def test_gpu_shares_pack_onto_whole_gpus():
    gpus = [NodeCapacity("a", {"CPU": 8.0, "GPU": 2.0})]
    assert HQDEStrategy(num_members=3).default_gpus_per_member(2) == 0.5
    assert HQDEStrategy(num_members=2).default_gpus_per_member(2) == 1.0
    assert HQDEStrategy(num_members=6).default_gpus_per_member(1) == pytest.approx(0.1666)
    for n in (3, 4, 5, 7):
        share = HQDEStrategy(num_members=n).default_gpus_per_member(2)
        check_members_fit([ray_resources({"num_cpus": 1, "num_gpus": share})] * n, gpus)
    # 0.667 each on 2 GPUs: two fit (one per GPU), the third has no GPU with room
    with pytest.raises(ValueError, match="member 2 of 3 asks for 1 CPU, 0.667 GPU"):
        check_members_fit([ray_resources({"num_cpus": 1, "num_gpus": 0.667})] * 3, gpus)


_LOOPBACK_FIT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import psutil
    sys.path.insert(0, {tests!r})
    from models import DigitsDataModule, DigitsModule
    from hqde_lightning import HQDEStrategy

    class Sockets(pl.Callback):
        def on_ensemble_fit_end(self, trainer, strategy, val_dataloaders):
            me = psutil.Process()
            found = []
            for proc in [me] + me.children(recursive=True):
                try:
                    found += [(proc.name(), c.laddr.ip) for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
                except psutil.Error:
                    pass
            self.found = found

    sockets = Sockets()
    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2, sync="none", seed=0, members_per_worker=1), max_epochs=1, limit_train_batches=2,
                         callbacks=[sockets], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    print("SOCKETS=" + json.dumps(sockets.found))
    """
)


def test_started_ray_listens_on_loopback_only(tmp_path):
    """The package starts Ray itself (in a fresh process, so not the session's instance)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_DIR, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _LOOPBACK_FIT.format(tests=TESTS_DIR)], cwd=str(tmp_path), env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("SOCKETS=")]
    sockets = json.loads(line[len("SOCKETS="):])
    names = {name for name, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers were found: {sorted(names)}"
    exposed = sorted({(name, ip) for name, ip in sockets if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")})
    assert not exposed, f"listening beyond loopback: {exposed}"
