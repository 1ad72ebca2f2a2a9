"""Encrypted runs checkpoint and resume: paused and resumed through the CLI, the run (with
DP-SGD: the institutions' private randomness replays too) ends bit for bit where the
uninterrupted one does; the checkpoint holds ciphertexts and
metadata only; a checkpoint of another key ceremony, and an institution state of another
run, are refused with the reason."""

import shutil

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from typer.testing import CliRunner

from client import he
from crypto.envelope import from_record
from crypto.keys import init_keys, load_client_keys, rotate_keys
from fedface.cli import app
from fedface.protocol import (
    HE_COMMIT_INDEX,
    HE_COMMIT_ROUND,
    HE_FINGERPRINT,
    HE_RUN,
    STATE_DIR,
    numpy_record,
)
from server.checkpoint import load_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he") / "keys"
    init_keys(folder, 3)
    return folder


def _train(args: list[str]) -> None:
    res = runner.invoke(app, ["train", *args])
    assert res.exit_code == 0, res.output


_RUNS: dict = {}  # the runs below, made once for the module's tests


@pytest.fixture
def runs(small_cfg, keys, tmp_path_factory):
    """An uninterrupted 2-round encrypted DP-SGD run ("full") and the same run paused
    after round 1 ("stopped", with the same institutions' secrets), both through
    `fedface train`. (DP-SGD: the resumed run also replays each institution's private
    randomness, its noise and sampling, bit for bit.)"""
    if _RUNS.get("keys") == keys:
        return _RUNS["root"]
    root = tmp_path_factory.mktemp("runs")
    sets = [a for k, v in small_cfg.items() for a in ("--set", f"{k.replace('_', '-')}={v}")]
    args = [*sets, "--set", "dp-epsilon=8.0", "--set", "batch-size=16", "--he-keys", str(keys),
            "--cache-dir", str(root / "cache")]
    _train([*args, "--out", str(root / "full")])
    (root / "stopped" / "clients").mkdir(parents=True)
    for f in (root / "full" / "clients").glob("*_randomness.key"):  # the same institutions
        shutil.copy2(f, root / "stopped" / "clients" / f.name)
    _train([*args, "--set", "pause-after=1", "--out", str(root / "stopped")])
    _RUNS.update(keys=keys, root=root)
    return root


def _arrays(tree) -> list:
    """Every tensor / array in a loaded checkpoint."""
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    if isinstance(tree, (list, tuple)):
        return [a for v in tree for a in _arrays(v)]
    return [tree] if isinstance(tree, (torch.Tensor, np.ndarray)) else []


@pytest.mark.slow
def test_a_paused_encrypted_run_resumes_bit_for_bit(runs, keys):
    """Paused after round 1 and resumed with `fedface train --resume`: the same final
    model (every tensor) and the same decrypted aggregate each round as the run that
    never stopped; the checkpoint keeps no plaintext model or update."""
    import json

    stopped = runs / "resumed"
    shutil.copytree(runs / "stopped", stopped)
    paused = load_checkpoint(stopped)
    assert paused["round"] == 1 and paused["arrays"] == {}
    # What the checkpoint holds: uint8 ciphertext blobs (the kept aggregate) and metadata.
    tensors = _arrays({k: v for k, v in paused.items() if k != "rng"})
    assert tensors and all(t.dtype == np.uint8 and t.ndim == 1 for t in tensors)
    state = paused["strategy"]["strategy"]
    assert sorted(state["history"]) == ["1"] and len(state["bound"]) == 3
    assert from_record(numpy_record(state["history"]["1"])).meta["count"] == 3
    # ... and nothing else: its arrays are exactly the envelope's blobs.
    assert sum(t.size for t in tensors) == sum(a.size for a in state["history"]["1"].values())
    _train(["--resume", str(stopped)])
    doc = json.loads((stopped / "metrics.json").read_text())
    assert doc["resumed_after_round"] == 1 and [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["dp"]["epsilon_max"] > 0 for r in doc["rounds"])  # DP-SGD ran in both
    (rejoin,) = doc["encryption"]["rejoins"]
    assert rejoin["joined"] == 3 and rejoin["lagging"] == [] and rejoin["after_round"] == 1
    # The committed aggregates of both rounds decrypt to the same sums ...
    k0 = load_client_keys(keys, 0)
    kept = [load_checkpoint(runs / d)["strategy"]["strategy"]["history"] for d in ("full", "resumed")]
    assert sorted(kept[0]) == sorted(kept[1]) == ["1", "2"]
    for r in ("1", "2"):
        a, b = (from_record(numpy_record(h[r])) for h in kept)
        assert a.meta == b.meta, r
        sums = [k0.context.decrypt(e.chunks) for e in (a, b)]
        assert np.array_equal(*sums), f"round {r}: {int((sums[0] != sums[1]).sum())} sums differ"
    # ... and the final model is the same, every tensor.
    full, back = (torch.load(runs / d / "model.pt", weights_only=True)["state_dict"]
                  for d in ("full", "resumed"))
    assert full.keys() == back.keys()
    assert [k for k in full if not torch.equal(full[k], back[k])] == []


@pytest.mark.slow
def test_a_checkpoint_of_another_ceremony_is_refused_before_anything_is_sent(runs, keys,
                                                                              tmp_path):
    """The keys were rotated after the pause: the resume is refused with the reason, and
    neither the checkpoint nor any institution's saved state changes."""
    stopped = tmp_path / "stopped"
    shutil.copytree(runs / "stopped", stopped)
    before = {f: f.read_bytes() for f in stopped.rglob("*") if f.is_file()}
    backup = tmp_path / "keys-backup"
    shutil.copytree(keys, backup)
    try:
        rotate_keys(keys)
        res = runner.invoke(app, ["train", "--resume", str(stopped)])
    finally:
        shutil.rmtree(keys)
        shutil.copytree(backup, keys)
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "(generation 1), and he-keys now holds" in out and "(generation 2)" in out
    after = {f: f.read_bytes() for f in stopped.rglob("*") if f.is_file()}
    assert sorted(after) == sorted(before)
    assert all(after[f] == b for f, b in before.items() if f.name != "metrics.json")


def _context(pid: int) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": pid}, state=RecordDict(),
                   run_config={})


def test_an_institution_restores_only_its_own_state_of_this_run(keys, tmp_path):
    """The institution saves its state under its state folder after every change; a
    rejoin restores it (committing the candidate the server names), and refuses a state
    of another run, or none, with the reason."""
    k = load_client_keys(keys, 1)
    model = {"w": np.arange(6, dtype=np.float32), "n": np.array([3], np.int64)}
    cfg = ConfigRecord({HE_RUN: "run-a", HE_FINGERPRINT: k.fingerprint, HE_COMMIT_ROUND: 0,
                        HE_COMMIT_INDEX: 0, STATE_DIR: str(tmp_path)})
    ctx = _context(1)
    he.join(ctx, k, cfg, numpy_record(model))
    saved = tmp_path / "he-institution-1" / "state.npz"
    assert saved.exists() and oct(saved.stat().st_mode & 0o777) == "0o600"
    # A candidate of round 1 is pending (the server's checkpoint names it committed).
    ctx.state[he.PENDING + "0"] = numpy_record({**model, "w": model["w"] + 1})
    state = ctx.state[he.STATE]
    state[he.PENDING_ROUND], state[he.PENDING_COUNT] = 1, 1
    he.save_state(ctx)
    back = _context(1)  # the institution restarted: its memory is empty
    assert he.rejoin(back, k, ConfigRecord({**cfg, HE_COMMIT_ROUND: 1})) == 1
    got, _ = he.global_model(back)
    assert list(got) == ["w", "n"] and np.array_equal(got["w"], model["w"] + 1)
    assert got["n"].dtype == np.int64
    # Behind the checkpoint (round 2 committed): it rejoins holding round 1 (catch-up).
    assert he.rejoin(_context(1), k, ConfigRecord({**cfg, HE_COMMIT_ROUND: 2})) == 1
    with pytest.raises(he.OutOfSync, match="belongs to encrypted run 'run-a'.*resumes run 'run-b'"):
        he.rejoin(_context(1), k, ConfigRecord({**cfg, HE_RUN: "run-b"}))
    with pytest.raises(he.OutOfSync, match="has no saved state"):
        he.rejoin(_context(2), load_client_keys(keys, 2), cfg)
    saved.write_bytes(b"torn")
    with pytest.raises(he.OutOfSync, match="unreadable"):
        he.rejoin(_context(1), k, cfg)
