"""Study: PFM and FV against centralized training and Flower's baselines on LFW.

Same budget of rounds and local epochs for every method: centralized, FedAvg, FedAvgM,
FedAdam, FedProx, PFM and PFM+FV. Training identities are LFW's ``peopleDevTrain.txt``
(those with at least 2 images) split identity-disjoint across 8 (and 16) institutions
with skewed sizes; evaluation on ``pairsDevTest.txt`` (identities unseen in training) and
the 10-fold ``pairs.txt``; mean and standard deviation over seeds.

    python experiments/pfm.py                 # full: 3 seeds x {8, 16} clients, 16 rounds
    python experiments/pfm.py --quick         # 1 seed, 8 clients, 4 rounds: under 10 min

The files are rewritten after every run, so an interrupted study keeps what it measured.

Writes ``experiments/results/pfm[_quick].json``, ``.md`` and ``_curves.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _study
import numpy as np

from fedface.config import RunConfig
from fedface.metrics import RunDocument
from fedface.runner import run

METHODS = {
    "centralized": {"mode": "centralized"},
    "fedavg": {"strategy": "fedavg"},
    "fedavgm": {"strategy": "fedavgm"},
    "fedadam": {"strategy": "fedadam"},
    "fedprox": {"strategy": "fedprox"},
    "pfm": {"strategy": "pfm"},
    "pfm+fv": {"strategy": "pfm", "fv": True},
}
FIGURES = ("accuracy", "auc", "tar_at_far_1e-3")


def main() -> None:
    ap = _study.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clients", default="8,16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--methods-for", action="append", default=[], metavar="C=LIST",
                    help="methods for C clients only, e.g. 16=centralized,fedavg,pfm,pfm+fv")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--append", action="store_true",
                    help="keep the runs of the existing result file (same settings) and run "
                         "only the (clients, seed, method) it lacks")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 8 clients, 4 rounds, pairsDevTest only")
    args = _study.parse(ap)
    _study.require_lfw(args.lfw)
    if args.quick:
        args.rounds, args.seeds, args.clients = 4, "0", "8"
    pairs = "pairsDevTest.txt" if args.quick else "pairsDevTest.txt,pairs.txt"
    tag = "pfm_quick" if args.quick else "pfm"
    methods = [m.strip() for m in args.methods.split(",")]
    per_clients = {}
    for item in args.methods_for:
        c, _, names = item.partition("=")
        if not c.strip().isdigit() or not names:
            raise SystemExit(f"--methods-for {item!r}: use CLIENTS=method,method")
        per_clients[int(c)] = [m.strip() for m in names.split(",")]
    unknown = set(methods).union(*per_clients.values()) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    runs, t_all, earlier = [], time.time(), 0.0
    old = _study.previous(args.out, tag) if args.append else None
    if old is not None:
        mine = {"rounds": args.rounds, "local_epochs": args.local_epochs,
                "image_size": args.image_size}
        if _study.changed_settings(old, mine):
            raise SystemExit(f"--append: {tag}.json was run with other settings "
                             f"({ {k: old.get(k) for k in mine} }, now {mine})")
        runs, earlier = old["runs"], float(old.get("seconds", 0.0))
        failed = old.get("failed", [])
    else:
        failed = []
    done = {(r["clients"], r["seed"], r["method"]) for r in runs + failed}
    # The methods the targets compare first, over every seed of a split: wherever a long
    # study is stopped, it has what matters most.
    first = ("fedavg", "pfm", "pfm+fv", "centralized")
    rank = {m: first.index(m) if m in first else len(first) + list(METHODS).index(m)
            for m in METHODS}
    plan = sorted(((c, s, m) for s in [int(x) for x in args.seeds.split(",")]
                   for c in [int(x) for x in args.clients.split(",")]
                   for m in per_clients.get(c, methods) if (c, s, m) not in done),
                  key=lambda t: (t[2] not in first, t[0], t[1], rank[t[2]]))
    for n_clients, seed, method in plan:
        cfg = RunConfig(
            data=str(args.lfw), train_people="peopleDevTrain.txt", pairs=pairs,
            image_size=args.image_size, num_clients=n_clients, partition="dirichlet",
            partition_alpha=1.0, rounds=args.rounds, local_epochs=args.local_epochs,
            seed=seed, min_train_nodes=max(2, n_clients // 2),
            out=str(args.out / tag / f"c{n_clients}-s{seed}-{method}"),
            **METHODS[method])
        t0 = time.time()
        try:
            doc = run(cfg)
        except (FloatingPointError, RuntimeError) as e:  # a diverged or stopped run is a result
            failed.append({"method": method, "clients": n_clients, "seed": seed,
                           "error": str(e).splitlines()[-1][:300]})
            print(json.dumps(failed[-1]), flush=True)
            continue
        result = RunDocument(doc)
        row = {"method": method, "clients": n_clients, "seed": seed,
               "seconds": round(time.time() - t0, 1),
               "final": {k: {f: v[f] for f in FIGURES} for k, v in result.final_reports().items()},
               "curve": result.test_curve(),
               "fv_chosen": [r["fv"]["chosen"] for r in result.rounds if "fv" in r]}
        runs.append(row)
        print(json.dumps({k: row[k] for k in ("method", "clients", "seed", "seconds")}
                         | {"devtest": row["final"]["pairsDevTest"]["accuracy"]}), flush=True)
        summary = {"study": "PFM / FV vs baselines on LFW", "rounds": args.rounds,
                   "local_epochs": args.local_epochs, "image_size": args.image_size,
                   "pairs": pairs.split(","),
                   "seconds": round(earlier + time.time() - t_all, 1),
                   "table": aggregate(runs), "paired": paired(runs), "failed": failed,
                   "runs": runs}
        _study.write_results(args.out, tag, summary, markdown)
        plot(runs, args.out / f"{tag}_curves.png")
    print((args.out / f"{tag}.md").read_text())


COMPARISONS = (("pfm", "fedavg"), ("pfm", "centralized"), ("pfm+fv", "pfm"),
               ("fedavg", "centralized"))


def paired(runs: list[dict]) -> list[dict]:
    """Accuracy differences (points) between methods run on the same seed and split."""
    out = []
    for clients in sorted({r["clients"] for r in runs}):
        acc = {(r["method"], r["seed"]): r["final"] for r in runs if r["clients"] == clients}
        for a, b in COMPARISONS:
            seeds = sorted(s for (m, s) in acc if m == a and (b, s) in acc)
            if not seeds:
                continue
            for pset in acc[(a, seeds[0])]:
                d = np.array([100 * (acc[(a, s)][pset]["accuracy"] - acc[(b, s)][pset]["accuracy"])
                              for s in seeds])
                out.append({"clients": clients, "a": a, "b": b, "pairs": pset,
                            "seeds": len(seeds), "mean": float(d.mean()),
                            "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                            "per_seed": [round(float(x), 2) for x in d]})
    return out


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per (clients, method, pair set)."""
    rows = []
    keys = sorted({(r["clients"], r["method"]) for r in runs},
                  key=lambda k: (k[0], list(METHODS).index(k[1])))
    for clients, method in keys:
        group = [r for r in runs if r["clients"] == clients and r["method"] == method]
        for pset in group[0]["final"]:
            row = {"clients": clients, "method": method, "pairs": pset, "seeds": len(group)}
            for f in FIGURES:
                vals = np.array([g["final"][pset][f] for g in group])
                row[f] = float(vals.mean())
                row[f + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    lines = [f"# {summary['study']}", "",
             f"{summary['rounds']} rounds x {summary['local_epochs']} local epochs, "
             f"{summary['image_size']}px, tinyface + softmax heads; mean ± std over seeds; "
             f"total {summary['seconds'] / 60:.0f} min.", "",
             "| clients | method | pair set | seeds | accuracy % | AUC | TAR@FAR=1e-3 % |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["table"]:
        lines.append(f"| {r['clients']} | {r['method']} | {r['pairs']} | {r['seeds']} | "
                     f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} | "
                     f"{r['auc']:.3f} ± {r['auc_std']:.3f} | "
                     f"{100 * r['tar_at_far_1e-3']:.1f} ± {100 * r['tar_at_far_1e-3_std']:.1f} |")
    lines += ["", "pairs.txt (View 2) shares 2,985 of its 4,281 identities with peopleDevTrain.txt, so its "
                 "figures are not identity-disjoint (flattering); pairsDevTest.txt is the "
                 "identity-disjoint test."]
    if summary.get("failed"):
        lines += ["", "Runs that did not finish (left out of the tables):", ""]
        lines += [f"- {f['clients']} clients, seed {f['seed']}, {f['method']}: {f['error']}"
                  for f in summary["failed"]]
    lines += ["", "Paired differences in accuracy points (same seed and split; mean ± std over "
                  "seeds, then each seed):", "",
              "| clients | difference | pair set | seeds | mean | per seed |", "|---|---|---|---|---|---|"]
    for d in summary.get("paired", []):
        lines.append(f"| {d['clients']} | {d['a']} - {d['b']} | {d['pairs']} | {d['seeds']} | "
                     f"{d['mean']:+.1f} ± {d['std']:.1f} | "
                     f"{', '.join(f'{x:+.1f}' for x in d['per_seed'])} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    clients = sorted({r["clients"] for r in runs})
    fig, axes = _study.subplots(1, len(clients), figsize=(6 * len(clients), 4), squeeze=False)
    for ax, c in zip(axes[0], clients):
        for method in METHODS:
            group = [r["curve"] for r in runs if r["clients"] == c and r["method"] == method]
            if not group:
                continue
            curve = np.nanmean(np.array(group, dtype=float), axis=0)
            ax.plot(np.arange(1, len(curve) + 1), 100 * curve, label=method)
        ax.set(title=f"LFW pairsDevTest, {c} institutions", xlabel="round",
               ylabel="accuracy %")
        ax.grid(alpha=0.3)
        ax.legend()
    _study.save_figure(fig, path)


if __name__ == "__main__":
    main()
