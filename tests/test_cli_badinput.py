"""The CLI and the data pipeline on bad input: clear messages, counts, nothing lost."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedface.cli import app
from fedface.config import RunConfig
from fedface.data import synthetic as syn
from fedface.data.prepare import prepare

runner = CliRunner()


def _identity_folder(root, n_ids=12, per_id=4):
    cfg = syn.SyntheticConfig(num_identities=n_ids, images_per_identity=per_id, size=64)
    for i in range(n_ids):
        d = root / f"person_{i:02d}"
        d.mkdir(parents=True)
        for j in range(per_id):
            Image.fromarray(syn.render_image(cfg, i, j)).save(d / f"{j}.jpg", quality=95)
    return root


def test_prepare_counts_every_bad_file_and_keeps_the_good(tmp_path):
    root = _identity_folder(tmp_path / "faces")
    (root / "person_00" / "empty.jpg").write_bytes(b"")
    good = (root / "person_01" / "0.jpg").read_bytes()
    (root / "person_01" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "person_02" / "notes.jpg").write_text("not an image")
    (root / "nobody").mkdir()
    grey = Image.fromarray(np.full((50, 70), 128, np.uint8))  # other size and mode
    grey.save(root / "person_03" / "grey.png")
    cfg = RunConfig(data=str(root), num_clients=2, image_size=48)
    prepared = prepare(cfg)
    rep = prepared.summary["report"]
    kinds = {p["kind"] for p in rep["problems"]}
    assert "empty_identity" in kinds
    assert {"empty_file", "unreadable_image"} & kinds
    reasons = " ".join(p["reason"] for p in rep["problems"])
    assert "cut.jpg" in json.dumps(rep["problems"]) and "notes.jpg" in json.dumps(rep["problems"])
    assert reasons  # each problem says why
    # 48 good images + 1 grey png; 3 broken ones dropped, the rest kept
    total = sum(c["train_images"] + c["val_images"] for c in prepared.summary["clients"])
    test_pairs = prepared.load_pairsets()[0]
    assert total + len(np.unique(np.concatenate([test_pairs.a, test_pairs.b]))) <= 49
    assert total > 0


def test_malformed_pair_line_names_file_and_line(tmp_path):
    root = _identity_folder(tmp_path / "faces", n_ids=8, per_id=3)
    for d in root.iterdir():  # LFW naming for the pair file
        for j, f in enumerate(sorted(d.glob("*.jpg"))):
            f.rename(d / f"{d.name}_{j + 1:04d}.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t3\nperson_00\t1\t2\nperson_01\t1\t2\ngarbage line here\n"
                     "person_00\t1\tperson_01\t1\nperson_02\t1\tperson_09\t1\n"
                     "person_02\t1\tperson_03\t1\n")
    cfg = RunConfig(data=str(root), pairs=str(pairs), num_clients=1, image_size=48,
                    min_train_nodes=1)
    prepared = prepare(cfg)
    problems = prepared.summary["report"]["problems"]
    bad = [p for p in problems if p["kind"] == "malformed_pair_line"]
    assert bad and bad[0]["line"] == 4 and bad[0]["path"].endswith("pairs.txt")
    assert any(p["kind"] == "missing_image" for p in problems)


def test_cli_help_for_every_command():
    for args in ([], ["demo"], ["train"], ["eval"], ["prepare"], ["models"], ["bench", "scale"]):
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, res.output
        assert "Usage" in res.output


def test_cli_errors_are_clear(tmp_path):
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "does not exist" in res.output
    res = runner.invoke(app, ["train", "--set", "rundz=3"])
    assert res.exit_code == 2 and "Unknown run-config keys" in res.output
    bad_model = tmp_path / "model.pt"
    bad_model.write_bytes(b"garbage")
    res = runner.invoke(app, ["eval", "--model", str(bad_model), "--images", str(tmp_path),
                              "--pairs", str(tmp_path / "p.txt")])
    assert res.exit_code == 2 and "not a readable fedface model file" in res.output


def test_cli_models_lists_registry():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("tinyface", "mobilefacenet", "iresnet18", "iresnet50", "cosface", "arcface"):
        assert name in res.output


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_training_refuses_non_finite_loss(bad):
    import torch

    from fedface.models import build_backbone, build_head
    from fedface.training import train_epochs

    bb = build_backbone("tinyface", input_size=32)
    with torch.no_grad():
        bb.fc.weight.fill_(float(bad))
    head = build_head("softmax", 128, 3)
    x = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_epochs(bb, head, x, np.array([0, 1, 2, 0]), batch_size=4)
