"""Differential privacy: budgets, ledgers, DP-SGD through Opacus, central DP, the MIA audit."""

import json
import math

import numpy as np
import pytest

from fedface.config import RunConfig
from fedface.privacy import (
    PrivacyLedger,
    central_epsilon,
)

# ----------------------------------------------------------------- federated, end to end


@pytest.fixture
def small(small_cfg) -> dict:
    """The small federation with batches DP-SGD can Poisson-sample (batch 8 < N) and one
    local epoch; each test sets its rounds."""
    return {k: v for k, v in {**small_cfg, "batch_size": 8, "local_epochs": 1}.items()
            if k != "rounds"}


@pytest.mark.slow
def test_federated_dp_accounts_every_round_and_stops_when_budgets_are_spent(small, tmp_path):
    from fedface.runner import run

    # Budgets planned for 2 rounds; the run asks for 3: every client declines round 3.
    cfg = RunConfig(**small, rounds=3, dp_epsilon=4.0, dp_rounds=2, out=str(tmp_path / "dp"))
    doc = run(cfg)
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert "privacy budgets spent" in doc["stopped"] and "round 2 is final" in doc["stopped"]
    plans = doc["dp_plans"]
    assert set(plans) == {"0", "1", "2"} and all(p["noise_multiplier"] > 0.5 for p in plans.values())
    first, second = (r["dp"]["epsilon_spent"] for r in doc["rounds"])
    for cid in plans:
        assert 0 < first[cid] < second[cid] <= 4.0 + 1e-2
        assert second[cid] == pytest.approx(4.0, abs=0.05)
    assert doc["final"]  # the run still reports its final verification figures
    # A restarted client knows what it spent: its ledger is on disk.
    ledger = PrivacyLedger.load(tmp_path / "dp" / "clients" / "client_000_privacy.json")
    assert [r["round"] for r in ledger.rounds] == [1, 2]
    assert ledger.spent == pytest.approx(second["0"], abs=1e-3)


@pytest.mark.slow
def test_person_level_dp_runs_end_to_end_and_accounts_people(small, tmp_path):
    from fedface.runner import run

    cfg = RunConfig(**{**small, "batch_size": 2}, rounds=2, dp_epsilon=8.0,
                    dp_unit="person", dp_person_images=2, out=str(tmp_path / "people"))
    doc = run(cfg)
    people = {str(c["client"]): c["train_identities"] for c in doc["data"]["clients"]}
    for cid, plan in doc["dp_plans"].items():
        assert plan["unit"] == "person" and plan["images_per_unit"] == 2
        assert plan["units"] == people[cid]
        assert plan["sample_rate"] == pytest.approx(2 / people[cid], abs=1e-5)
    spent = doc["rounds"][-1]["dp"]["epsilon_spent"]
    assert set(spent) == set(people) and all(e == pytest.approx(8.0, abs=0.05) for e in spent.values())


@pytest.mark.slow
def test_a_client_with_a_spent_ledger_declines_and_the_others_carry_on(small, tmp_path):
    from fedface.privacy import plan_for_run
    from fedface.runner import run

    cfg = RunConfig(**{**small, "min_train_nodes": 2}, rounds=2, dp_epsilon=4.0,
                    out=str(tmp_path / "dp"))
    # Client 1 spent its whole budget in an earlier run (its ledger says so).
    from fedface.data.prepare import prepare

    c1 = {c["client"]: c for c in prepare(cfg).summary["clients"]}[1]
    plan = plan_for_run(cfg, c1["train_images"], c1["train_identities"], "client 1")
    ledger = PrivacyLedger.load(tmp_path / "dp" / "clients" / "client_001_privacy.json")
    for rnd in (1, 2):
        ledger.record(rnd, plan, plan.steps_per_round)
    doc = run(cfg)
    for r in doc["rounds"]:
        assert r["clients_ok"] == 2 and r["dp"]["declined"] == 1
        assert "1" not in r["dp"]["epsilon_spent"]
        (exc,) = r["excluded"]
        assert "privacy budget exhausted" in exc["reason"]


@pytest.mark.slow
def test_central_dp_noises_the_release_and_accounts_dropouts(small, tmp_path):
    """Server-side central DP. Without DP-SGD the clients train from the public seed, so
    two runs differ in round 1 only by the server's noise: std noise x clip / m. A run in
    which one of three institutions fails every round is accounted at the noise its
    releases really carried (2/3 of the nominal multiplier)."""
    from fedface.data.prepare import prepare
    from fedface.models.io import load_backbone
    from fedface.runner import run

    base = dict(small, rounds=1, central_dp="server-fixed", central_dp_clip=0.5)
    models = []
    for z in (0.0, 0.3):
        cfg = RunConfig(**base, central_dp_noise=z, out=str(tmp_path / f"z{z}"))
        doc = run(cfg)
        models.append(load_backbone(tmp_path / f"z{z}" / "model.pt")[0].state_dict())
    diff = np.concatenate([(models[1][k] - models[0][k]).flatten().numpy()
                           for k in models[0] if models[0][k].is_floating_point()])
    assert diff.std() == pytest.approx(0.3 * 0.5 / 3, rel=0.05)
    assert doc["rounds"][0]["central_dp"]["noise_multiplier_effective"] == 0.3
    assert doc["rounds"][0]["central_dp"]["epsilon"] < math.inf
    # Institution 1 loses its data and fails each round: 2 of the 3 sampled replies.
    cfg = RunConfig(**{**base, "min_train_nodes": 2, "rounds": 2}, central_dp_noise=0.3,
                    out=str(tmp_path / "drop"), cache_dir=str(tmp_path / "cache"))
    prepare(cfg).client_files[1].unlink()
    doc = run(cfg)
    for r in doc["rounds"]:
        c = r["central_dp"]
        assert c["aggregated"] == 2 and c["sampled"] == 3
        assert c["noise_multiplier_effective"] == pytest.approx(0.2)
    last = doc["rounds"][-1]["central_dp"]
    assert last["epsilon"] == pytest.approx(central_epsilon([0.2, 0.2], 1.0, None, last["delta"]))
    assert last["epsilon"] > last["epsilon_if_all_replied"]


@pytest.mark.slow
def test_server_adaptive_central_dp_runs_and_reports_its_epsilon(small, tmp_path):
    from fedface.runner import run

    cfg = RunConfig(**small, rounds=2, central_dp="server-adaptive", central_dp_noise=0.05,
                    central_dp_clip=0.5, out=str(tmp_path / "adaptive"))
    doc = run(cfg)
    eps = [r["central_dp"]["epsilon"] for r in doc["rounds"]]
    assert 0 < eps[0] < eps[1] < math.inf
    assert eps[1] == pytest.approx(central_epsilon(0.05, 1.0, 2, doc["rounds"][1]["central_dp"]["delta"]))
    assert all(r["central_dp"]["mode"] == "server-adaptive" for r in doc["rounds"])


@pytest.mark.slow
def test_cli_reports_epsilon_per_institution_and_refuses_bad_batches(tmp_path):
    from typer.testing import CliRunner

    from fedface.cli import app

    base = ["train", "--clients", "3", "--rounds", "2", "--image-size", "48", "--local-epochs", "1",
            "--set", "synthetic-identities=60", "--set", "synthetic-images=6",
            "--set", "min-train-nodes=3", "--epsilon", "4"]
    res = CliRunner().invoke(app, [*base, "--batch-size", "8", "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert "DP-SGD: epsilon spent per institution (budget 4.0 over 2 rounds" in res.output
    doc = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    spent = doc["rounds"][-1]["dp"]["epsilon_spent"]
    assert len(spent) == 3 and all(3.9 < e <= 4.001 for e in spent.values())
    # A batch larger than an institution's data is refused before any training.
    res = CliRunner().invoke(app, [*base, "--batch-size", "500", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2
    assert "batch-size=500 is not below N" in res.output and "use --batch-size" in res.output
    assert not (tmp_path / "bad" / "metrics.json").exists()
