"""Shared fixtures: one local Ray instance for the whole session, real digits data."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray instance (never someone else's cluster), shut down after the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def in_a_group(monkeypatch):
    """The members must train as one member group (fits it could not run used to train in threads of the driver, one after another)."""
    import hqde_lightning.launcher as launcher

    def no_threads(*args, **kwargs):
        raise AssertionError("the members trained in threads, not in a member group")

    monkeypatch.setattr(launcher, "MemberThreads", no_threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
