"""End-to-end: federated simulations with Flower, centralized training, eval, CLI."""

import json

import numpy as np
import pytest
import torch

from fedface.config import RunConfig
from fedface.evaluate import evaluate_model_on_pairs
from fedface.models import build_backbone
from fedface.models.io import load_backbone
from fedface.protocol import backbone_record
from fedface.runner import run

pytestmark = pytest.mark.slow

SMALL = dict(synthetic_identities=60, synthetic_images=6, image_size=48, num_clients=3,
             rounds=2, batch_size=32, min_train_nodes=3)


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


def test_federated_simulation_on_synthetic(tmp_path):
    cfg = RunConfig(**SMALL, out=str(tmp_path / "fed"))
    doc = run(cfg)
    name, rep = _check_doc(doc, cfg, 3)
    r1 = doc["rounds"][0]
    assert r1["clients_ok"] == 3 and r1["clients_failed"] == []
    # Bytes: every client receives the backbone twice (train, evaluate) and sends it once.
    model_bytes = backbone_record(build_backbone("tinyface", input_size=48)).count_bytes()
    assert r1["bytes_up"] == 3 * model_bytes
    assert r1["bytes_down"] == 2 * 3 * model_bytes
    # model.pt reproduces the final figure through `fedface eval`'s code path.
    model, meta = load_backbone(tmp_path / "fed" / "model.pt")
    assert meta["backbone"] == "tinyface" and meta["image_size"] == 48
    data_root = doc["data"]["root"]
    ev = evaluate_model_on_pairs(tmp_path / "fed" / "model.pt", data_root,
                                 f"{data_root}/pairs_heldout.txt")
    assert ev["verification"]["accuracy"] == pytest.approx(rep["accuracy"], abs=1e-9)
    assert 0.0 <= ev["rank1"] <= 1.0


def test_centralized_same_data_same_protocol(tmp_path):
    cfg = RunConfig(**SMALL, mode="centralized", out=str(tmp_path / "cen"))
    doc = run(cfg)
    _check_doc(doc, cfg, 3)
    assert all(r["bytes_up"] == 0 for r in doc["rounds"])
    # The same prepared data as the federated run: same training images in total.
    assert doc["data"]["train_images"] == sum(c["train_images"] for c in doc["data"]["clients"])


def test_federated_simulation_on_orl(tmp_path, orl_root):
    cfg = RunConfig(data=str(orl_root), image_size=48, num_clients=4, rounds=2, batch_size=32,
                    min_train_nodes=4, out=str(tmp_path / "orl"))
    doc = run(cfg)
    name, rep = _check_doc(doc, cfg, 4)
    assert name == "heldout"  # ORL has no pair protocol: held-out identities make one
    assert doc["data"]["train_identities"] == 32  # 8 of 40 identities held out for testing
    assert doc["data"]["report"]["counts"].get("detected", 0) >= 300


def test_initial_backbone_is_seeded():
    from server.loop import initial_backbone

    a = initial_backbone(RunConfig(seed=1)).state_dict()
    b = initial_backbone(RunConfig(seed=1)).state_dict()
    c = initial_backbone(RunConfig(seed=2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
