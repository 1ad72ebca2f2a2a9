"""Client-side preprocessing: an institution's prepared chips anonymized once, cached beside
them, originals untouched; the settings change the cache key."""

import hashlib

import numpy as np
import pytest

from fedface.anonymize.chips import anonymize_chips, anonymized_client_data
from fedface.config import RunConfig
from fedface.data.prepare import ClientData


def _client(path, n=30, size=48):
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % 5
    ClientData(chips[:20], labels[:20], chips[20:], labels[20:]).save(path)
    return chips


def test_chips_are_anonymized_once_and_cached(tmp_path):
    path = tmp_path / "client_000.npz"
    chips = _client(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = RunConfig(anonymize="mosaic", anonymize_preset="high")
    data = anonymized_client_data(path, cfg)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the original stays
    cached = list(tmp_path.glob("client_000.anon-*.npz"))
    assert len(cached) == 1
    assert data.x_train.shape == (20, 48, 48, 3) and len(data.x_val) == 10
    assert np.array_equal(data.y_train, np.arange(20) % 5)
    assert not np.array_equal(data.x_train, chips[:20])
    assert np.array_equal(data.x_train, anonymize_chips(chips[:20], "mosaic", "high"))
    mtime = cached[0].stat().st_mtime_ns
    again = anonymized_client_data(path, cfg)
    assert cached[0].stat().st_mtime_ns == mtime and np.array_equal(again.x_train, data.x_train)
    anonymized_client_data(path, cfg.replace(anonymize_preset="low"))
    assert len(list(tmp_path.glob("client_000.anon-*.npz"))) == 2  # other settings, other file
    plain = anonymized_client_data(path, RunConfig())
    assert np.array_equal(plain.x_train, chips[:20])


def test_ksame_pools_the_institution_and_refuses_too_few(tmp_path):
    path = tmp_path / "client_001.npz"
    _client(path, n=12)
    data = anonymized_client_data(path, RunConfig(anonymize="ksame", anonymize_options="k=4"))
    allx = np.concatenate([data.x_train, data.x_val])
    # Every output chip is shared by at least k = 4 of the institution's chips.
    _, counts = np.unique(allx.reshape(len(allx), -1), axis=0, return_counts=True)
    assert counts.min() >= 4
    with pytest.raises(ValueError, match="at least k=20"):
        anonymized_client_data(path, RunConfig(anonymize="ksame", anonymize_options="k=20"))


def test_the_client_trains_on_the_anonymized_copy(tmp_path):
    from types import SimpleNamespace

    from client.task import load_client_data
    from fedface.protocol import NODE_PARTITION_ID

    chips = _client(tmp_path / "client_002.npz")
    cfg = RunConfig(anonymize="blur", anonymize_preset="high")
    context = SimpleNamespace(node_config={NODE_PARTITION_ID: 2}, run_config=cfg.to_run_config())
    data = load_client_data(context, str(tmp_path), cfg)
    assert not np.array_equal(data.x_train, chips[:20])
    assert np.array_equal(data.x_train, anonymize_chips(chips[:20], "blur", "high"))
    # Without an explicit config the node reads the run config Flower gave it.
    assert np.array_equal(load_client_data(context, str(tmp_path)).x_train, data.x_train)


def test_an_institution_with_fewer_than_k_faces_sends_nothing(tmp_path):
    """Adversary: whoever receives the institution's training images (pooled training) or
    model (federated). An institution that cannot make its images k-anonymous declines:
    its raw images are never used instead."""
    from client.mods import error_code
    from fedface.anonymize.ksame import NotEnoughFacesError
    from fedface.data.prepare import PreparedData
    from fedface.protocol import ERR_PRIVACY_REFUSED

    big, small = tmp_path / "client_000.npz", tmp_path / "client_001.npz"
    _client(big, n=30)
    _client(small, n=6)
    data = PreparedData(tmp_path, [big, small], [])
    pooled = data.load_pooled(RunConfig(anonymize="ksame", anonymize_options="k=8"))
    assert len(pooled.x_train) + len(pooled.x_val) == 30  # the small institution is out
    assert data.summary["anonymize_excluded"][0]["institution"] == 1
    assert "at least k=8" in data.summary["anonymize_excluded"][0]["reason"]
    # Federated: the client declines with the code the server records as a refusal.
    assert error_code(NotEnoughFacesError("ksame needs at least k=8 faces")) == ERR_PRIVACY_REFUSED
