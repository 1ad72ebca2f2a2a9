"""An encrypted run's checkpoint: the strategy's state survives a checkpoint file, holds
ciphertexts and metadata only, and is refused under another key ceremony."""

import numpy as np
import pytest
import torch

from crypto.keys import init_keys, load_server_keys, rotate_keys
from crypto.update import Quantization
from fedface.protocol import numpy_record, record_numpy
from server.checkpoint import load_checkpoint, save_checkpoint
from server.encrypted import EncryptedFedAvg


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he") / "keys"
    init_keys(folder, 3)
    return folder


def _blob(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _strategy(keys) -> EncryptedFedAvg:
    s = EncryptedFedAvg(load_server_keys(keys), Quantization())
    s.commit_point, s.weight_ref = (2, 0), 40
    s.history = {r: numpy_record({"header": _blob(50, r), "tag": _blob(32, r + 10),
                                  "ct-00000": _blob(300, r + 20)}) for r in (1, 2)}
    s.members = {2**63 + 11, 5, 7}  # Flower node ids are 64-bit
    s.bound = {2**63 + 11: 0, 5: 1, 7: 2}
    s.lagging = {7}
    s.dirs = {"data-dir": "/d", "state-dir": "/s"}
    s.summary = {"joined": 3, "fingerprint": s.keys.fingerprint, "join_excluded": [],
                 "params": {"poly_modulus_degree": 4096}, "layout": {"bits": 15}}
    return s


def test_the_encrypted_state_survives_a_checkpoint_file(tmp_path, keys):
    s = _strategy(keys)
    save_checkpoint(tmp_path, 2, {}, {"strategy": s.state_dict(), "fv": {}}, {"he_keys": "k"},
                    {"rounds": []})
    ck = load_checkpoint(tmp_path)
    assert ck["arrays"] == {}  # no model
    back = EncryptedFedAvg(load_server_keys(keys), Quantization())
    assert back.run_id != s.run_id
    back.load_state_dict(ck["strategy"]["strategy"])
    for name in ("run_id", "commit_point", "weight_ref", "members", "bound", "lagging", "dirs",
                 "summary"):
        assert getattr(back, name) == getattr(s, name), name
    assert sorted(back.history) == [1, 2]
    for r, rec in s.history.items():
        got, want = record_numpy(back.history[r]), record_numpy(rec)
        assert list(got) == list(want)
        assert all(np.array_equal(got[k], want[k]) and got[k].dtype == np.uint8 for k in want)
    # What the file holds: uint8 ciphertext blobs (and the RNG state), no float array.
    blob = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    tensors = []

    def walk(x):
        if isinstance(x, dict):
            [walk(v) for v in x.values()]
        elif isinstance(x, (list, tuple)):
            [walk(v) for v in x]
        elif isinstance(x, (torch.Tensor, np.ndarray)):
            tensors.append(x)
    walk({k: v for k, v in blob.items() if k != "rng"})
    assert len(tensors) == 6 and all(t.dtype == torch.uint8 for t in tensors)


def test_a_checkpoint_of_another_ceremony_or_a_plaintext_run_is_refused(tmp_path, keys):
    import shutil

    state = _strategy(keys).state_dict()
    other = tmp_path / "other"
    init_keys(other, 3)
    with pytest.raises(ValueError, match=r"written under key fingerprint .*\(generation 1\).*"
                                         "Resume with the keys the run started with"):
        EncryptedFedAvg(load_server_keys(other), Quantization()).load_state_dict(state)
    rotated = tmp_path / "rotated"
    shutil.copytree(keys, rotated)
    rotate_keys(rotated)
    with pytest.raises(ValueError, match=r"\(generation 1\), and he-keys now holds .*\(generation 2\)"):
        EncryptedFedAvg(load_server_keys(rotated), Quantization()).load_state_dict(state)
    fresh = EncryptedFedAvg(load_server_keys(keys), Quantization())
    with pytest.raises(ValueError, match="written by a plaintext run"):
        fresh.load_state_dict({})
    with pytest.raises(ValueError, match="does not keep"):
        fresh.load_state_dict({"momentum": np.zeros(3)})
    fresh.load_state_dict(state)  # its own ceremony: restored
    assert fresh.run_id == state["run_id"]
