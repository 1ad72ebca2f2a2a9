"""``fedface bench deploy``: the same 3-site job deployed (a real SuperLink and SuperNodes
with TLS and node authentication, on loopback) and in simulation, in one run.

Per mode: seconds per round (the server's own round timer, train and evaluate exchanges
included), payload bytes per round (the model arrays and records fedface sends and
receives, the same accounting in both modes), and the bytes that crossed the loopback
interface during the job. In the deployment every payload crosses loopback more than
once (ServerApp -> SuperLink -> SuperNode -> ClientApp and back, TLS framing, HTTP
headers, polling and heartbeats); in simulation Ray moves it through its object store,
partly over loopback as well. Both counts are what this machine saw, not a model of a
wide-area network.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedface.config import RunConfig
from fedface.data.prepare import prepare
from fedface.deploy.processes import LocalDeployment, wait_until

SITES = 3


def _loopback() -> int:
    nics = psutil.net_io_counters(pernic=True)
    lo = nics.get("lo") or nics.get("lo0")
    return int(lo.bytes_sent) if lo is not None else 0


def _summary(doc: dict, wall: float, lo_bytes: int, mode: str, encrypted: bool) -> dict:
    rounds = doc["rounds"]
    n = len(rounds)
    return {
        "mode": mode, "encrypted": encrypted, "rounds": n,
        "seconds_per_round": round(sum(r["seconds"] for r in rounds) / n, 2),
        "payload_bytes_per_round": int(sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / n),
        "loopback_bytes_per_round": int(lo_bytes / n),
        "loopback_over_payload": round(lo_bytes / n / max(
            sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / n, 1), 2),
        "job_wall_seconds": round(wall, 1),
        "clients_ok": [r["clients_ok"] for r in rounds],
        "final_accuracy": doc.get("final", {}).get("pairs_heldout", {}).get("accuracy"),
    }


def run(work: Path, app_dir: Path, quick: bool = False, encrypted: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Measure; ``work`` is a scratch folder (emptied first)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    setting = dict(synthetic_identities=60 if quick else 150, synthetic_images=6 if quick else 8,
                   image_size=32 if quick else 48, num_clients=SITES, rounds=2 if quick else 3,
                   local_epochs=1, batch_size=32, min_train_nodes=SITES,
                   cache_dir=str(work / "cache"), num_cpus_per_client=1.0)
    prepared = prepare(RunConfig(**setting))
    files = sorted(Path(prepared.root).glob("client_*.npz"))
    modes = [False, True] if encrypted and not quick else [False]
    rows = []
    with LocalDeployment(work / "deployed", SITES, app_dir) as dep:
        dep.provision()
        he_dir = str(dep.coordinator / "he")
        from fedface.runner import run as run_simulation

        # A first run pays for warming caches and thread pools: not measured.
        run_simulation(RunConfig(**{**setting, "rounds": 1}, out=str(work / "sim-warm-up")))
        for enc in modes:

            extra = {"he_keys": str(work / "sim-keys")} if enc else {}
            if enc and not (work / "sim-keys").exists():
                from crypto.keys import init_keys

                init_keys(work / "sim-keys", SITES)
            log(f"simulation, {'encrypted' if enc else 'plaintext'}")
            cfg = RunConfig(**setting, **extra, out=str(work / f"sim-{int(enc)}"))
            lo0, t0 = _loopback(), time.time()
            doc = run_simulation(cfg)
            rows.append(_summary(doc, time.time() - t0, _loopback() - lo0, "simulation", enc))
            log(json.dumps(rows[-1]))
        dep.start_superlink()
        for enc in modes:
            log(f"deployed, {'encrypted' if enc else 'plaintext'}")
            for k in range(SITES):
                old = dep.nodes.get(k)
                if old is not None:
                    old.stop()
                dep.start_supernode(k, files[k], *([] if enc else ["--no-he"]), wait=False)
            for k in range(SITES):
                wait_until(lambda k=k: "SuperNode ID" in dep.nodes[k].text(), 120,
                           f"site {k} online", dep.nodes[k])
            out = work / f"deployed-{int(enc)}"
            rc = {k.replace("_", "-"): v for k, v in setting.items()}
            rc.update({"out": str(out), "round-timeout": 600.0,
                       **({"he-keys": he_dir} if enc else {})})
            lo0, t0 = _loopback(), time.time()
            job = dep.submit(rc, f"job-{int(enc)}")
            code = job.wait(1800)
            if code != 0:
                raise RuntimeError(f"the deployed job failed (code {code}):\n{job.tail()}")
            doc = json.loads((out / "metrics.json").read_text())
            rows.append(_summary(doc, time.time() - t0, _loopback() - lo0,
                                 "deployed (TLS, node auth)", enc))
            log(json.dumps(rows[-1]))
    ratios = {}
    for enc in modes:
        sim = next(r for r in rows if r["mode"] == "simulation" and r["encrypted"] == enc)
        dep_row = next(r for r in rows if r["mode"] != "simulation" and r["encrypted"] == enc)
        ratios["encrypted" if enc else "plaintext"] = {
            "seconds_per_round": round(dep_row["seconds_per_round"] / sim["seconds_per_round"], 2),
            "payload_bytes_per_round": round(dep_row["payload_bytes_per_round"]
                                             / sim["payload_bytes_per_round"], 3),
            "extra_seconds_per_round": round(dep_row["seconds_per_round"]
                                             - sim["seconds_per_round"], 2),
        }
    return {"bench": "deploy", "sites": SITES, "quick": quick,
            "setting": {k: v for k, v in setting.items() if k != "cache_dir"},
            "machine": f"{psutil.cpu_count()} cores",
            "rows": rows, "deployed_over_simulation": ratios}


def markdown(res: dict) -> str:
    s = res["setting"]
    lines = [f"# Deployed vs simulated, {res['sites']} sites",
             "",
             f"`fedface bench deploy`: {s['synthetic_identities']} generated identities x "
             f"{s['synthetic_images']} images at {s['image_size']} px, {s['rounds']} rounds of "
             f"{s['local_epochs']} local epoch, every site every round; {res['machine']}.",
             "",
             "| mode | encrypted | s / round | payload MB / round | loopback MB / round "
             "(x payload) | job wall s | clients per round |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['mode']} | {'yes' if r['encrypted'] else 'no'} | "
                     f"{r['seconds_per_round']:.1f} | {r['payload_bytes_per_round'] / 1e6:.2f} | "
                     f"{r['loopback_bytes_per_round'] / 1e6:.2f} ({r['loopback_over_payload']}x) | "
                     f"{r['job_wall_seconds']:.0f} | "
                     f"{', '.join(map(str, r['clients_ok']))} |")
    lines += ["", "Deployed over simulation:", ""]
    for k, v in res["deployed_over_simulation"].items():
        lines.append(f"- {k}: {v['seconds_per_round']}x seconds per round "
                     f"(+{v['extra_seconds_per_round']} s), {v['payload_bytes_per_round']}x "
                     "payload bytes")
    lines += ["", "The deployed round's extra seconds are fixed costs of Flower's deployment "
              "runtime, not of fedface's work: each message runs in a fresh ClientApp process "
              "(subprocess isolation: a Python interpreter, torch imported, the app unpacked), "
              "SuperNodes poll the SuperLink every 3 s when idle and the ServerApp polls for "
              "replies every 3 s. Loopback bytes count every hop on this machine (ServerApp to "
              "SuperLink to SuperNode to ClientApp and back, TLS and HTTP framing, heartbeats); "
              "in simulation Ray moves the arrays through shared memory."]
    return "\n".join(lines) + "\n"
