"""End-to-end: federated simulations with Flower, centralized training, eval, CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedface.cli import app
from fedface.config import RunConfig
from fedface.models import build_backbone
from fedface.models.io import load_backbone
from fedface.protocol import backbone_record
from fedface.runner import run

pytestmark = pytest.mark.slow
runner = CliRunner()



def _check_doc(doc, cfg, n_clients):
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, cfg.rounds + 1))
    for r in rounds:
        for key in ("train_loss", "val_accuracy", "seconds", "bytes_up", "bytes_down",
                    "test_accuracy"):
            assert key in r, key
        assert np.isfinite(r["train_loss"])
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    (name, rep), = [(k, v) for k, v in doc["final"].items() if isinstance(v, dict)]
    for key in ("accuracy", "auc", "eer", "tar_at_far_1e-3"):
        assert 0.0 <= rep[key] <= 1.0
    assert 0.0 <= rep["raw_pixels"]["accuracy"] <= 1.0
    on_disk = json.loads(cfg.out and open(f"{cfg.out}/metrics.json").read())
    assert on_disk["final"][name]["accuracy"] == rep["accuracy"]
    assert on_disk["config"]["num_clients"] == n_clients
    return name, rep


def test_federated_training_and_eval_through_the_cli(tmp_path):
    """`fedface train` (Flower simulation, 3 institutions) then `fedface eval` on model.pt."""
    out = tmp_path / "fed"
    args = ["train", "--clients", "3", "--rounds", "2", "--image-size", "48", "--batch-size", "32",
            "--out", str(out), "--set", "synthetic-identities=60", "--set", "synthetic-images=6",
            "--set", "min-train-nodes=3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Verification" in res.output and "raw acc%" in res.output
    doc = json.loads((out / "metrics.json").read_text())
    cfg = RunConfig.from_run_config(doc["config"])
    name, rep = _check_doc(doc, cfg, 3)
    r1 = doc["rounds"][0]
    assert r1["clients_ok"] == 3 and r1["excluded"] == []
    # FedAvg restarts every momentum each round: no head momentum is kept.
    assert sorted(p.name for p in (out / "clients").glob("client_000_head*")) == [
        "client_000_head_r00001.pt", "client_000_head_r00002.pt"]
    # Bytes: every client receives the backbone twice (train, evaluate) and sends it once.
    model_bytes = backbone_record(build_backbone("tinyface", input_size=48)).count_bytes()
    assert r1["bytes_up"] == 3 * model_bytes
    assert r1["bytes_down"] == 2 * 3 * model_bytes
    # model.pt reproduces the final figure through `fedface eval`.
    model, meta = load_backbone(out / "model.pt")
    assert meta["backbone"] == "tinyface" and meta["image_size"] == 48
    data_root = doc["data"]["root"]
    res = runner.invoke(app, ["eval", "--model", str(out / "model.pt"), "--images", data_root,
                              "--pairs", f"{data_root}/pairs_heldout.txt",
                              "--json", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["verification"]["accuracy"] == pytest.approx(rep["accuracy"], abs=1e-9)
    assert 0.0 <= ev["rank1"] <= 1.0 and ev["rank1_probes"] > 0


def test_centralized_same_data_same_protocol(small_cfg, tmp_path):
    cfg = RunConfig(**small_cfg, mode="centralized", out=str(tmp_path / "cen"))
    doc = run(cfg)
    _check_doc(doc, cfg, 3)
    assert all(r["bytes_up"] == 0 for r in doc["rounds"])
    # The same prepared data as the federated run: same training images in total.
    assert doc["data"]["train_images"] == sum(c["train_images"] + c["val_images"]
                                              for c in doc["data"]["clients"])


def test_federated_simulation_on_orl(tmp_path, orl_root):
    cfg = RunConfig(data=str(orl_root), image_size=48, num_clients=4, rounds=2, batch_size=32,
                    min_train_nodes=4, out=str(tmp_path / "orl"))
    doc = run(cfg)
    name, rep = _check_doc(doc, cfg, 4)
    assert name == "heldout"  # ORL has no pair protocol: held-out identities make one
    assert doc["data"]["train_identities"] == 32  # 8 of 40 identities held out for testing
    assert doc["data"]["report"]["counts"].get("detected", 0) >= 300


def test_initial_backbone_is_seeded():
    from fedface.models import initial_backbone

    a = initial_backbone(RunConfig(seed=1)).state_dict()
    b = initial_backbone(RunConfig(seed=1)).state_dict()
    c = initial_backbone(RunConfig(seed=2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pfm_with_fv_records_candidates_momentum_and_bytes(small_cfg, tmp_path):
    cfg = RunConfig(**small_cfg, strategy="pfm", fv=True, fv_candidates=3, out=str(tmp_path / "pfm"))
    doc = run(cfg)
    _check_doc(doc, cfg, 3)
    mb = backbone_record(build_backbone("tinyface", input_size=48)).count_bytes()
    for r in doc["rounds"]:
        assert r["strategy"] == "pfm" and r["momentum_norm"] > 0
        names = [c["name"] for c in r["fv"]["candidates"]]
        assert names == ["samples", "uniform", names[2]] and r["fv"]["chosen"] in names
        assert all(c["score"] is not None for c in r["fv"]["candidates"])
        assert all(abs(sum(c["weights"]) - 1) < 1e-3 for c in r["fv"]["candidates"])
    # PFM: each head keeps its own momentum from round to round, next to the head.
    for cid in range(3):
        kept = sorted(p.name for p in (tmp_path / "pfm" / "clients").glob(f"client_{cid:03d}_headm_r*"))
        assert kept == [f"client_{cid:03d}_headm_r00001.pt", f"client_{cid:03d}_headm_r00002.pt"]
    # Round 1: model down for training; round 2 also the momentum. Evaluate carries the
    # round's model and the 2 other FV candidates.
    assert doc["rounds"][0]["bytes_down"] == 3 * mb + 3 * 3 * mb
    assert doc["rounds"][1]["bytes_down"] == 3 * 2 * mb + 3 * 3 * mb


def test_resume_after_a_stop_ends_with_the_same_model(small_cfg, tmp_path):
    from fedface.runner import resume_config

    base = dict(small_cfg, rounds=3, strategy="pfm")
    full = run(RunConfig(**base, out=str(tmp_path / "full")))
    paused = run(RunConfig(**base, pause_after=2, out=str(tmp_path / "stopped")))
    assert paused["paused_after_round"] == 2 and paused["final"] == {}
    assert (tmp_path / "stopped" / "checkpoint.pt").exists()
    assert not (tmp_path / "stopped" / "model.pt").exists()
    resumed = run(resume_config(str(tmp_path / "stopped")), resume=True)
    assert resumed["resumed_after_round"] == 2
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in full["rounds"]]
    a, _ = load_backbone(tmp_path / "full" / "model.pt")
    b, _ = load_backbone(tmp_path / "stopped" / "model.pt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), f"{ka} differs after resume"  # bit-exact


def test_a_crashing_client_is_excluded_and_the_run_goes_on(small_cfg, tmp_path):
    from fedface.data.prepare import prepare

    # Its own cache: the data loss below must not leak into other tests' prepared data.
    cfg = RunConfig(**{**small_cfg, "min_train_nodes": 2}, out=str(tmp_path / "crash"),
                    cache_dir=str(tmp_path / "cache"))
    prepare(cfg).client_files[1].unlink()  # institution 1 loses its data: it errors each round
    doc = run(cfg)
    for r in doc["rounds"]:
        assert r["clients_ok"] == 2 and r["num_excluded"] == 1
        assert "client error" in r["excluded"][0]["reason"]
        assert "client_001.npz" in r["excluded"][0]["reason"]
    strict = cfg.replace(min_train_nodes=3, out=str(tmp_path / "strict"))  # needs all 3
    with pytest.raises(RuntimeError, match="only 2 usable replies, min-train-nodes=3"):
        run(strict)
