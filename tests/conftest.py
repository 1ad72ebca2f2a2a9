import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("FEDFACE_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test uses a cache below the session's tmp dir, never ~/.cache/fedface."""
    monkeypatch.setenv("FEDFACE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def orl_root():
    root = SHARED_DATA / "orl"
    if not (root / "s1").exists():
        pytest.skip(f"{root} not found: real-data tests need the shared data folder "
                    "(set FEDFACE_SHARED_DATA to its path)")
    return root


@pytest.fixture
def lfw_root():
    root = SHARED_DATA / "lfw"
    if not (root / "pairs.txt").exists():
        pytest.skip(f"{root} not found: real-data tests need the shared data folder "
                    "(set FEDFACE_SHARED_DATA to its path)")
    return root


@pytest.fixture
def flower_task(monkeypatch):
    """Messages are built outside a live run: give them the identity Flower expects."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
