"""The CLI and the data pipeline on bad input: clear messages, counts, nothing lost."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedface.cli import app
from fedface.config import RunConfig
from fedface.data import synthetic as syn
from fedface.data.prepare import prepare
from fedface.errors import UserError, user_errors
from fedface.metrics import RunDocument, pair_reports, write_json

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
    for args in ([], ["demo"], ["train"], ["eval"], ["prepare"], ["models"], ["bench"],
                 ["bench", "scale"], ["bench", "dp"], ["bench", "he"], ["keys"], ["keys", "init"],
                 ["keys", "show"], ["keys", "rotate"]):
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, res.output
        assert "Usage" in res.output


def test_the_fedface_script_starts_the_cli_and_sets_the_omp_wait_policy():
    """`python -m fedface.cli` is the `fedface` script (``fedface.cli:main``); it sets
    OMP_WAIT_POLICY before any command loads torch, and loading the CLI loads no torch."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-m", "fedface.cli", "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0 and "Usage: python -m fedface.cli" in res.stdout, res.stderr
    code = ("import os, sys; sys.argv = ['fedface', '--help']\n"
            "from fedface.cli import main\n"
            "assert 'torch' not in sys.modules\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('OMP', os.environ['OMP_WAIT_POLICY'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "OMP PASSIVE" in res.stdout, res.stderr


def test_user_errors_leave_through_the_one_error_exit(monkeypatch):
    """A UserError from any command (nested groups too) prints `error: <message>` and
    exits 2; the library's older refusals a command names are mapped the same way."""
    import crypto.keys

    def refuse(folder):
        raise UserError(f"no keys in {folder}")

    monkeypatch.setattr(crypto.keys, "describe_keys", refuse)
    res = runner.invoke(app, ["keys", "show", "somewhere"])
    assert res.exit_code == 2 and res.output == "error: no keys in somewhere\n"
    res = runner.invoke(app, ["bench", "scale", "--json", "x.json", "--set", "lr"])
    assert res.exit_code == 2 and "error: --set 'lr': use KEY=VALUE" in res.output
    res = runner.invoke(app, ["keys", "init", "--out", "k", "--poly-modulus-degree", "7"])
    assert res.exit_code == 2 and "error: poly_modulus_degree=7" in res.output
    with pytest.raises(UserError, match="bad") as err, user_errors(ValueError):
        raise ValueError("bad")
    assert isinstance(err.value.__cause__, ValueError)
    with pytest.raises(KeyError), user_errors(ValueError):  # not named: not the user's
        raise KeyError("bug")


def _run_doc(final=True):
    rounds = [{"round": r, "train_loss": 2.0 / r, "val_accuracy": 0.5, "test_accuracy": 0.6 + r / 100,
               "num_excluded": 0, "seconds": 1.0, "bytes_down": 2e6, "bytes_up": 1e6,
               "dp": {"epsilon_spent": {"0": 0.5 * r, "1": 0.4 * r} if r < 3 else {"0": 1.5}},
               "central_dp": {"mode": "server-fixed", "epsilon": 0.3 * r, "delta": 1e-5,
                              "noise_multiplier": 1.1, "clip": 0.5, "aggregated": 2, "sampled": 2,
                              "epsilon_if_all_replied": 0.3 * r}}
              for r in (1, 2, 3)]
    report = {"num_pairs": 100, "accuracy": 0.8, "accuracy_std": 0.05, "auc": 0.9, "eer": 0.2,
              "tar_at_far_1e-3": 0.1, "raw_pixels": {"accuracy": 0.6}}
    config = {**RunConfig(rounds=3, dp_epsilon=2.0).to_dict(), "mode": "federated"}
    return {"config": config, "data": {"clients": [{"train_images": 10}] * 2, "source": "synthetic"},
            "rounds": rounds, "dp_plans": {k: {"delta": 1e-5, "noise_multiplier": 1.0,
                                                "steps_per_round": 3, "units": 10} for k in "01"},
            "final": ({"heldout": report, "wall_seconds": 12.0, "bytes_up": 3, "bytes_down": 6,
                       "model": "m/model.pt"} if final else {}),
            "stopped": "round 3: privacy budgets spent (1 declined)"}


def test_run_document_reads_reports_rounds_and_privacy(tmp_path):
    doc = _run_doc()
    write_json(tmp_path / "metrics.json", doc)
    run = RunDocument.load(tmp_path)
    assert run.doc == json.loads((tmp_path / "metrics.json").read_text())
    assert list(run.final_reports()) == ["heldout"] == list(pair_reports(doc["final"]))
    assert run.final_report()["accuracy"] == run.final_report("heldout")["accuracy"] == 0.8
    assert run.last_round["round"] == 3 and run.test_curve() == [0.61, 0.62, 0.63]
    # Institution 1 sat out round 3: it keeps what it spent in round 2.
    assert run.dp_spent() == {"0": 1.5, "1": 0.8}
    assert [c["epsilon"] for c in run.central_dp()] == [0.3, 0.6, 0.3 * 3]
    assert (run.wall_seconds, run.model, run.encryption, run.paused_after_round) == (
        12.0, "m/model.pt", None, None)
    empty = RunDocument(_run_doc(final=False))
    assert empty.final_reports() == {} and empty.model is None and empty.wall_seconds == 0
    with pytest.raises(KeyError):
        empty.final_report()


def test_train_prints_the_run_summary(monkeypatch, tmp_path):
    """The summary tables of `fedface train` from the run's document (the run faked)."""
    import fedface.runner

    monkeypatch.setattr(fedface.runner, "run", lambda cfg, **kw: _run_doc())
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    for text in ("fedface train (federated): federated", "Rounds", "heldout", "80.0±5.0", "+20.0",
                 "DP-SGD: epsilon spent per institution (budget 2.0 over 3 rounds",
                 "central DP (server-fixed): client-level epsilon 0.900",
                 "stopped early: round 3", "wall time 12 s; model: m/model.pt", "metrics:"):
        assert text in out, text
    monkeypatch.setattr(fedface.runner, "run", lambda cfg, **kw: {**_run_doc(False), "paused_after_round": 2})
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "paused after round 2: continue with `fedface train --resume" in res.output

    def fail(cfg, **kw):
        raise RuntimeError("The federated run ended without results")

    monkeypatch.setattr(fedface.runner, "run", fail)
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error: The federated run ended without results" in res.output


def test_bench_commands_time_write_and_print_their_json(monkeypatch, tmp_path):
    import fedface.bench

    for name in ("bench_he", "bench_scale", "bench_dp"):
        monkeypatch.setattr(fedface.bench, name, lambda *a, name=name, **kw: {"benchmark": name})
    for cmd in ("he", "scale", "dp"):
        res = runner.invoke(app, ["bench", cmd, "--json", str(tmp_path / f"{cmd}.json")])
        assert res.exit_code == 0, res.output
        written = json.loads((tmp_path / f"{cmd}.json").read_text())
        assert written == json.loads(res.output) and written["benchmark"] == f"bench_{cmd}"
        assert written["bench_seconds"] >= 0


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
