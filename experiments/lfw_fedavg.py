"""Study: centralized training vs FedAvg on LFW, against the raw-pixel reference.

Train on the identities of ``peopleDevTrain.txt`` with at least 2 images, split across
8 identity-disjoint institutions with skewed (Dirichlet) sizes; evaluate on
``pairsDevTest.txt`` (identities disjoint from DevTrain) and on the 10-fold ``pairs.txt``.

    python experiments/lfw_fedavg.py                 # full study (about 30 min on 2 cores)
    python experiments/lfw_fedavg.py --quick         # a short schedule, same protocol

Writes ``experiments/results/lfw_fedavg[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import time

import _study

from fedface.config import RunConfig
from fedface.metrics import RunDocument, pair_reports
from fedface.runner import run


def main() -> None:
    ap = _study.parser(__doc__, lfw_help="LFW root (pairs files inside)")
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 rounds: a smoke run of the study")
    args = _study.parse(ap)
    _study.require_lfw(args.lfw, "pass --lfw PATH (an LFW tree with pairs files)")
    rounds = 8 if args.quick else args.rounds
    tag = "lfw_fedavg_quick" if args.quick else "lfw_fedavg"
    base = dict(
        data=str(args.lfw), train_people="peopleDevTrain.txt",
        pairs="pairsDevTest.txt,pairs.txt", min_images=2, image_size=args.image_size,
        num_clients=args.clients, partition="dirichlet", partition_alpha=1.0,
        rounds=rounds, local_epochs=1, seed=args.seed,
    )
    results = {}
    for mode in ("centralized", "federated"):
        cfg = RunConfig(**base, mode=mode, out=str(args.out / tag / mode))
        t0 = time.time()
        result = RunDocument(run(cfg))
        results[mode] = {"final": result.final, "rounds": result.rounds,
                         "wall_seconds": round(time.time() - t0, 1)}
        print(mode, json.dumps({k: v["accuracy"] for k, v in result.final_reports().items()}))
    summary = portable({"study": "centralized vs FedAvg on LFW", "config": base,
                        "data": result.data, "results": results})
    print(_study.write_results(args.out, tag, summary, markdown))


def portable(obj):
    """Paths of this machine written relative to the repository (results are committed)."""
    root = str(_study.HERE.parent)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        return os.path.relpath(obj, root)
    return obj


def markdown(summary: dict) -> str:
    res = summary["results"]
    lines = [f"# {summary['study']}", "",
             f"Config: `{json.dumps(summary['config'])}`", "",
             "| method | pair set | accuracy % (10-fold) | AUC | EER % | TAR@FAR=1e-3 % | wall s |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in res.items():
        for name, rep in pair_reports(r["final"]).items():
            lines.append(f"| {mode} | {name} | {100 * rep['accuracy']:.1f} ± "
                         f"{100 * rep['accuracy_std']:.1f} | {rep['auc']:.3f} | "
                         f"{100 * rep['eer']:.1f} | {100 * rep['tar_at_far_1e-3']:.1f} | "
                         f"{r['wall_seconds']:.0f} |")
    first = next(iter(res.values()))["final"]
    for name, rep in pair_reports(first).items():
        if "raw_pixels" in rep:
            raw = rep["raw_pixels"]
            lines.append(f"| raw pixels | {name} | {100 * raw['accuracy']:.1f} ± "
                         f"{100 * raw['accuracy_std']:.1f} | {raw['auc']:.3f} | "
                         f"{100 * raw['eer']:.1f} | {100 * raw['tar_at_far_1e-3']:.1f} | - |")
    lines += ["", "pairs.txt (View 2) shares 2,985 of its 4,281 identities with peopleDevTrain.txt, so its "
                 "figures are not identity-disjoint (flattering); pairsDevTest.txt is the "
                 "identity-disjoint test."]
    c = res.get("centralized", {}).get("final", {}).get("pairsDevTest", {})
    f = res.get("federated", {}).get("final", {}).get("pairsDevTest", {})
    if c and f:
        gap = 100 * (f["accuracy"] - c["accuracy"])
        gain = 100 * (f["accuracy"] - f["raw_pixels"]["accuracy"])
        lines += ["", f"FedAvg - centralized on pairsDevTest: {gap:+.1f} points; "
                  f"FedAvg - raw pixels: {gain:+.1f} points."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
