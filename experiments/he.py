"""Study: does encrypted aggregation change what the federation learns, and what does it cost?

The same federated run twice, plaintext FedAvg and encrypted aggregation (BFV, 15-bit
stochastic quantization, clip 0.5), with identical seeds, for several seeds:

- the embedded default (``fedface demo``: 320 generated identities, 8 institutions,
  10 rounds), and
- LFW (``peopleDevTrain.txt`` across 8 institutions, Dirichlet(100), 16 rounds x 1 epoch,
  64px), scored on ``pairsDevTest.txt`` and 10-fold ``pairs.txt`` (skipped when LFW is absent).

Reported per run: final verification accuracy, mean round seconds and bytes up and down
per round; per pair: the accuracy gap (plaintext - encrypted) in points.

    python experiments/he.py            # demo x 3 seeds, LFW x 1 seed (about 25 min, 2 cores)
    python experiments/he.py --quick    # demo x 2 seeds only (about 5 min)

Writes ``experiments/results/he[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _study

from crypto.keys import init_keys
from fedface.config import RunConfig
from fedface.metrics import RunDocument
from fedface.runner import run


def pair(name: str, cfg: RunConfig, keys: str, out: Path) -> dict:
    """The run plaintext, then encrypted; accuracies per pair set and costs."""
    row: dict = {"setting": name, "seed": cfg.seed}
    for mode in ("plain", "encrypted"):
        c = cfg.replace(out=str(out / f"{name}-s{cfg.seed}-{mode}"),
                        he_keys=keys if mode == "encrypted" else "")
        t0 = time.time()
        result = RunDocument(run(c))
        rounds = result.rounds
        row[mode] = {
            "final": {k: round(v["accuracy"], 4) for k, v in result.final_reports().items()},
            "round_seconds": round(statistics.mean(r["seconds"] for r in rounds[1:]), 3),
            "bytes_up_per_round": int(statistics.mean(r["bytes_up"] for r in rounds)),
            "bytes_down_per_round": int(statistics.mean(r["bytes_down"] for r in rounds)),
            "wall_seconds": round(time.time() - t0, 1)}
    row["gap_points"] = {k: round(100 * (row["plain"]["final"][k] - row["encrypted"]["final"][k]), 2)
                         for k in row["plain"]["final"]}
    print(row, flush=True)
    return row


def main() -> None:
    ap = _study.parser(__doc__)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the demo setting")
    ap.add_argument("--lfw-seeds", type=int, default=1)
    ap.add_argument("--lfw-rounds", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="demo setting, 2 seeds")
    args = _study.parse(ap)
    tag = "he_quick" if args.quick else "he"
    runs = args.out / tag
    keys = tempfile.mkdtemp(prefix="fedface-he-study-")
    init_keys(Path(keys) / "k", 8)
    keys = str(Path(keys) / "k")
    rows, t_all = [], time.time()
    for seed in range(2 if args.quick else args.seeds):
        rows.append(pair("demo", RunConfig(seed=seed), keys, runs))
    if not args.quick and _study.has_lfw(args.lfw):
        for seed in range(args.lfw_seeds):
            cfg = RunConfig(data=str(args.lfw), train_people="peopleDevTrain.txt",
                            pairs="pairsDevTest.txt,pairs.txt", image_size=64, num_clients=8,
                            partition="dirichlet", partition_alpha=100.0,
                            rounds=args.lfw_rounds, local_epochs=1, batch_size=32, seed=seed,
                            min_train_nodes=8)
            rows.append(pair("lfw", cfg, keys, runs))
    gaps = {}
    for r in rows:
        for k, g in r["gap_points"].items():
            gaps.setdefault(f"{r['setting']}:{k}", []).append(g)
    summary = {"study": "Encrypted vs plaintext aggregation (FedAvg, 8 institutions)",
               "seconds": round(time.time() - t_all, 1), "results": rows,
               "mean_gap_points": {k: round(statistics.mean(v), 2) for k, v in gaps.items()},
               "target_gap_points": 0.5}
    print(_study.write_results(args.out, tag, summary, markdown))


def markdown(summary: dict) -> str:
    lines = [f"# {summary['study']}", "",
             f"Total {summary['seconds'] / 60:.0f} min. Gap = plaintext - encrypted accuracy, "
             "in points (positive: encryption cost accuracy).", "",
             "| setting | seed | pair set | plaintext acc % | encrypted acc % | gap (points) | "
             "round s plain / enc | MB up+down per round plain / enc |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        p, e = r["plain"], r["encrypted"]
        mb = (f"{(p['bytes_up_per_round'] + p['bytes_down_per_round']) / 1e6:.1f} / "
              f"{(e['bytes_up_per_round'] + e['bytes_down_per_round']) / 1e6:.1f}")
        for k in p["final"]:
            lines.append(f"| {r['setting']} | {r['seed']} | {k} | {100 * p['final'][k]:.1f} | "
                         f"{100 * e['final'][k]:.1f} | {r['gap_points'][k]:+.2f} | "
                         f"{p['round_seconds']:.1f} / {e['round_seconds']:.1f} | {mb} |")
    lines += ["", "Mean gap per setting and pair set: " + ", ".join(
        f"{k} {v:+.2f}" for k, v in summary["mean_gap_points"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
