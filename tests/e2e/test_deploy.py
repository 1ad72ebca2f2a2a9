"""A real deployment on loopback: ``fedface deploy init``, a ``flower-superlink`` with TLS and
node authentication (``fedface deploy superlink``), three ``flower-supernode``s with their
own data folders (``fedface deploy supernode``), jobs submitted with ``flwr run .``.

The adversaries played here: a node whose key is not registered (a stranger, or a site
whose key was revoked), a client that talks plaintext to the TLS SuperLink, a site whose
CA is not the deployment's (a man in the middle's certificate), and the faults a
deployment meets: a site that crashes mid-round, a coordinator that crashes mid-run.

Every process is started by :class:`fedface.deploy.processes.LocalDeployment` and stopped
by its PID with all its descendants when the module's tests end.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from crypto.pki import make_node_key
from fedface.config import RunConfig
from fedface.data.prepare import prepare
from fedface.deploy.launch import flwr_env, preflight, tool
from fedface.deploy.processes import LocalDeployment, Proc, free_port, rounds_done, wait_until
from fedface.deploy.provision import init_deployment

ROOT = Path(__file__).resolve().parents[2]
SITES = 3
DATA = dict(synthetic_identities=60, synthetic_images=6, image_size=32, num_clients=SITES)


def job_config(out: Path, cache: Path, **changes) -> dict:
    """A small job's run config, the same settings a simulation would take."""
    return {"rounds": 2, "local-epochs": 1, "num-clients": SITES, "min-train-nodes": 2,
            "batch-size": 32, "synthetic-identities": DATA["synthetic_identities"],
            "synthetic-images": DATA["synthetic_images"], "image-size": DATA["image_size"],
            "round-timeout": 90.0, "out": str(out), "cache-dir": str(cache), **changes}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[int, Path]]:
    """The sites' data: prepared once, each site's file in a folder of its own."""
    root = tmp_path_factory.mktemp("data")
    cache = root / "cache"
    prepared = prepare(RunConfig(**DATA, cache_dir=str(cache)))
    files = {}
    for k, f in enumerate(sorted(Path(prepared.root).glob("client_*.npz"))):
        d = root / f"site-{k}"
        d.mkdir()
        files[k] = Path(shutil.copy(f, d / "client_000.npz"))
    return cache, files


@contextmanager
def running(root: Path, data) -> Iterator[LocalDeployment]:
    """A provisioned deployment with its SuperLink running; every process it started,
    and every process those started (Flower's SuperExec, ServerApp and ClientApp
    processes), is gone when it ends."""
    dep = LocalDeployment(root, SITES, ROOT)
    dep.cache, dep.data = data
    try:
        dep.provision()
        dep.start_superlink()
        yield dep
    finally:
        dep.close()
        assert all(not p.alive() for p in dep.procs)
        assert [p.leftovers() for p in dep.procs if p.leftovers()] == []


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, data):
    """The deployment of the plaintext job, the faults and the refusals."""
    with running(tmp_path_factory.mktemp("deploy"), data) as dep:
        yield dep


@pytest.fixture(scope="module")
def encrypted_job(tmp_path_factory, data):
    """A second deployment (its own CA, keys and SuperLink) whose sites send encrypted
    updates only and cap epsilon at 8, and the 2-round encrypted DP-SGD job submitted to
    it. It runs while the plaintext job waits out a lost site's heartbeat (2 cores)."""
    with running(tmp_path_factory.mktemp("deploy-he"), data) as dep:
        start_sites(dep, "--epsilon", "8")
        out = dep.root / "he-dp"
        cfg = job_config(out, dep.cache, **{
            "he-keys": str(dep.coordinator / "he"), "dp-epsilon": 8.0, "dp-rounds": 2,
            "dp-accountant": "rdp", "batch-size": 16, "min-train-nodes": SITES,
            "round-timeout": 300.0})
        yield dep, dep.submit(cfg, "he-dp"), out


def start_sites(dep: LocalDeployment, *extra: str) -> None:
    for k in range(SITES):
        old = dep.nodes.get(k)
        if old is not None and old.alive():
            old.stop()
        dep.start_supernode(k, dep.data[k], *extra, wait=False)
    for k in range(SITES):
        wait_until(lambda k=k: "SuperNode ID" in dep.nodes[k].text(), 120,
                   f"site {k}'s SuperNode to connect", dep.nodes[k])


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_provisioned_folders_hold_only_what_each_recipient_needs(deployment, encrypted_job):
    coord, site = deployment.coordinator, deployment.site(1)
    assert (coord / "tls/server.key").stat().st_mode & 0o077 == 0
    assert not (coord / "he/secret.key").exists()  # the server can add, never decrypt
    assert not list(coord.rglob("auth.key"))  # no site's private node key
    assert (site / "he/secret.key").stat().st_mode & 0o777 == 0o600
    assert not (site / "tls/server.key").exists() and not (site / "ca.key").exists()
    assert not list(site.glob("site-*")) and (site / "README.md").exists()
    # The CA's private key is in neither folder.
    assert not list(coord.rglob("ca.key")) and not list(site.rglob("ca.key"))


def test_a_plaintext_job_survives_a_crashed_site_and_a_crashed_coordinator(deployment):
    """A 3-round plaintext job over TLS with node authentication. Site 2 is killed in
    round 2: the round completes with the other two. The coordinator then crashes while
    round 3 starts; restarted, the run resumes from its checkpoint with every completed
    round, and site 2, restarted, takes part again."""
    dep = deployment
    start_sites(dep, "--no-he")
    # The SuperLink registered each provisioned key, and knows nothing else.
    nodes = json.loads((dep.coordinator / "state/nodes.json").read_text())
    assert sorted(nodes) == ["0", "1", "2"]
    out = dep.root / "plain"
    # Flower answers for a lost node once its heartbeat lapses (about a minute); the
    # round timeout only bounds a hung round (the encrypted job runs beside this one).
    cfg = job_config(out, dep.cache, rounds=3)
    job = dep.submit(cfg, "plain")
    wait_until(lambda: rounds_done(out) >= 1, 300, "round 1", job)
    dep.nodes[2].kill()  # a crash: the SuperNode and its ClientApp, no goodbye
    wait_until(lambda: rounds_done(out) >= 2, 300, "round 2 without site 2", job)
    round1, round2 = metrics(out)["rounds"][:2]
    assert round1["clients_ok"] == SITES and round1["excluded"] == []
    assert round2["clients_ok"] == 2
    lost = round2["excluded"]
    assert len(lost) == 1 and str(lost[0]["node"]) == str(nodes["2"])  # named: site 2
    dep.superlink.kill()  # the coordinator crashes while round 3 starts
    job.wait(120)
    site2 = dep.start_supernode(2, dep.data[2], "--no-he", wait=False)
    dep.start_superlink()
    wait_until(lambda: "SuperNode ID" in site2.text(), 180, "site 2 back", site2)
    wait_until(lambda: dep.online() == SITES, 180, "all three sites back online")
    # (Reconnected nodes may still be backing off: no short timeout for this round.)
    resumed = dep.submit({**cfg, "resume": True, "round-timeout": 150.0}, "plain-resumed")
    assert resumed.wait(400) == 0, resumed.tail()
    doc = metrics(out)
    assert doc["resumed_after_round"] == 2
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert doc["rounds"][2]["clients_ok"] == SITES, doc["rounds"][2]  # site 2 is back
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in doc["rounds"])
    assert 0.0 <= doc["final"]["pairs_heldout"]["accuracy"] <= 1.0
    assert (out / "model.pt").exists()


def test_an_encrypted_job_with_dp_sgd(encrypted_job):
    dep, job, out = encrypted_job
    assert job.wait(600) == 0, job.tail()
    doc = metrics(out)
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["clients_ok"] == SITES for r in doc["rounds"])
    manifest = json.loads((dep.coordinator / "deployment.json").read_text())
    assert doc["encryption"]["fingerprint"] == manifest["he"]["fingerprint"]
    assert sorted(doc["encryption"]["senders"].values()) == [0, 1, 2]  # each site, its index
    assert 0 < doc["rounds"][-1]["dp"]["epsilon_max"] <= 8.0 + 1e-6
    # Each site kept its own ledger of what it spent, in its own folder.
    for k in range(SITES):
        assert list((dep.site(k) / "state").glob("*ledger*.json"))


def test_strangers_revoked_sites_plaintext_and_a_wrong_ca_are_refused(deployment, tmp_path):
    dep = deployment
    env = flwr_env(tmp_path / "flwr")
    # A node with a key the SuperLink never registered.
    make_node_key(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    rogue = Proc("rogue", [tool("flower-supernode"), "--superlink", dep.address,
                           "--root-certificates", str(dep.site(0) / "tls/ca.crt"),
                           "--auth-supernode-private-key", str(tmp_path / "rogue.key"),
                           "--port", str(free_port()), "--max-retries", "2",
                           "--max-wait-time", "20"],
                 env, tmp_path / "rogue.log")
    dep.procs.append(rogue)
    assert rogue.wait(120) != 0
    assert "Failed to activate SuperNode" in rogue.text()
    # Two SuperNodes claiming one site: the second is refused while the first is online.
    if 0 not in dep.nodes or not dep.nodes[0].alive():
        dep.start_supernode(0, dep.data[0])
    first = dep.nodes[0]
    twin = dep.start_supernode(0, dep.data[0], "--max-retries", "2", "--max-wait", "5",
                               wait=False)
    assert twin.wait(120) == 2
    assert "Failed to activate SuperNode" in twin.text()  # Flower's own refusal
    assert "already connected" in twin.text() and first.alive()  # and ours, with the fix
    # A plaintext client of the TLS SuperLink gets no answer, and no node joins that way.
    plain = Proc("plain", [tool("flower-supernode"), "--superlink", dep.address, "--insecure",
                           "--port", str(free_port()), "--max-retries", "2",
                           "--max-wait-time", "20"],
                 env, tmp_path / "plain.log")
    dep.procs.append(plain)
    assert plain.wait(120) != 0
    assert "SuperNode ID" not in plain.text()
    conn = http.client.HTTPConnection("127.0.0.1", dep.port, timeout=10)
    try:
        conn.request("GET", "/")
        status = conn.getresponse().status
    except (http.client.HTTPException, ConnectionError):
        status = None  # the TLS listener drops the plaintext request
    assert status in (None, 400), status  # never served: no 200, no 404 of a plain server
    preflight(dep.address, dep.site(0) / "tls/ca.crt", max_retries=1)  # TLS with the CA: yes
    # A revoked site: its key is unregistered, its next start is refused with the reason.
    if 1 in dep.nodes:
        dep.nodes[1].stop()
    revoke = subprocess.run([sys.executable, "-m", "fedface.cli", "deploy", "revoke",
                             str(dep.coordinator), "--site", "1"], env=dep.env(),
                            capture_output=True, text=True, timeout=120)
    assert revoke.returncode == 0, revoke.stdout + revoke.stderr
    assert "unregistered" in revoke.stdout
    refused = dep.start_supernode(1, dep.data[1], "--max-retries", "2", "--max-wait", "5",
                                  wait=False)
    assert refused.wait(120) == 2
    assert "Failed to activate SuperNode" in refused.text()
    assert "refused to activate site 1's node key" in refused.text()
    # A site holding another provisioning's CA: named before its node starts.
    other = init_deployment(tmp_path / "other", 2)
    wrong = subprocess.run([sys.executable, "-m", "fedface.cli", "deploy", "supernode",
                            str(other.site(0)), "--data", str(dep.data[0]), "--superlink",
                            dep.address, "--max-retries", "2"], env=dep.env(),
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert "does not accept" in wrong.stdout and "tls/ca.crt" in wrong.stdout
