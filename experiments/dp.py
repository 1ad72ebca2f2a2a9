"""Study: privacy / utility of client-side DP-SGD on LFW, and the membership-inference audit.

FedAvg across 8 institutions holding LFW ``peopleDevTrain.txt`` identities (identity-
disjoint, near-equal sizes: Dirichlet(100), so that every institution can Poisson-sample
batches of 32), every institution training with DP-SGD under the budget epsilon for all
rounds, at delta = min(1e-5, 1/(10 N)); epsilon = inf is the same run without DP.
Reported per epsilon: ``pairsDevTest.txt`` and 10-fold ``pairs.txt`` accuracy, the
epsilon actually spent (PRV accountant), and the AUC of a loss-threshold membership
inference attack on each institution's final model (global backbone + its own head):
members are its training images; non-members are held-out images of the same people
(``holdout-images=1``: record-level, what DP-SGD bounds) and, as a second figure,
images of other people (its private validation identities).

    python experiments/dp.py            # full: 16 rounds, both pair sets
    python experiments/dp.py --quick    # 3 rounds, pairsDevTest: under 10 min on 2 cores

Writes ``experiments/results/dp[_quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see fedface.cli)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedface.config import RunConfig  # noqa: E402
from fedface.data.prepare import prepare  # noqa: E402
from fedface.metrics import write_json  # noqa: E402
from fedface.models import build_head  # noqa: E402
from fedface.models.io import load_backbone  # noqa: E402
from fedface.privacy import membership_inference_auc  # noqa: E402
from fedface.runner import run  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_LFW = HERE.parent.parent / "shared" / "data" / "lfw"


def audit(cfg: RunConfig, max_images: int = 300) -> list[dict]:
    """Membership inference on every institution's final model, two ways.

    ``records``: members are its training images, non-members held-out images of the
    *same* people (``holdout-images``): what sample-level DP-SGD bounds. ``people``:
    non-members are images of *other* people (its validation identities), so the attack
    also detects whether a person is in the data, which DP-SGD bounds only by group
    privacy (a person has several images).
    """
    data = prepare(cfg)
    backbone, _ = load_backbone(Path(cfg.out) / "model.pt")
    rows = []
    for i in range(len(data.client_files)):
        cd = data.load_client(i)
        heads = sorted((Path(cfg.out) / "clients").glob(f"client_{i:03d}_head_r*.pt"))
        if not heads or len(cd.y_val) == 0:
            continue
        head = build_head(cfg.head, cfg.embedding_size, cd.num_classes)
        head.load_state_dict(torch.load(heads[-1], map_location="cpu", weights_only=True))
        rng = np.random.default_rng(i)
        members = cd.x_train[rng.permutation(len(cd.x_train))[:max_images]]
        row = {"client": i}
        for kind, others in (("records", cd.x_holdout), ("people", cd.x_val)):
            if others is None or len(others) == 0:
                continue
            others = others[rng.permutation(len(others))[:max_images]]
            res = membership_inference_auc(backbone, head, members, others)
            row[kind] = {k: res[k] for k in ("auc", "attack", "members", "non_members")}
        rows.append(row)
    return rows


def _mia(rows: list[dict], kind: str) -> tuple[float | None, float | None]:
    aucs = [r[kind]["auc"] for r in rows if kind in r]
    return (float(np.mean(aucs)), float(np.max(aucs))) if aucs else (None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=DEFAULT_LFW)
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 rounds, pairsDevTest only")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not (args.lfw / "pairsDevTest.txt").exists():
        raise SystemExit(f"LFW not found at {args.lfw}: pass --lfw PATH")
    if args.quick:
        args.rounds = 3
    pairs = "pairsDevTest.txt" if args.quick else "pairsDevTest.txt,pairs.txt"
    tag = "dp_quick" if args.quick else "dp"
    rows, t_all = [], time.time()
    for eps in [float(e) for e in args.epsilons.split(",")]:
        cfg = RunConfig(
            data=str(args.lfw), train_people="peopleDevTrain.txt", pairs=pairs,
            image_size=args.image_size, num_clients=args.clients, partition="dirichlet",
            partition_alpha=100.0, rounds=args.rounds, local_epochs=1,
            batch_size=args.batch_size, seed=args.seed, min_train_nodes=args.clients,
            holdout_images=1,
            dp_epsilon=0.0 if math.isinf(eps) else eps,
            out=str(args.out / tag / f"eps-{eps:g}"))
        # A fresh study: the run folder holds the clients' privacy ledgers of any earlier
        # study, which would (rightly) refuse to spend the budget again.
        shutil.rmtree(cfg.out, ignore_errors=True)
        t0 = time.time()
        doc = run(cfg)
        mia = audit(cfg)
        spent = doc["rounds"][-1].get("dp", {}).get("epsilon_spent", {})
        row = {"epsilon": eps if math.isfinite(eps) else "inf", "seconds": round(time.time() - t0, 1),
               "epsilon_spent_max": max(spent.values(), default=None),
               "delta": max((p["delta"] for p in doc.get("dp_plans", {}).values()), default=None),
               "noise_multiplier": [p["noise_multiplier"] for p in doc.get("dp_plans", {}).values()],
               "final": {k: {f: v[f] for f in ("accuracy", "accuracy_std", "auc")}
                         for k, v in doc["final"].items() if isinstance(v, dict) and "accuracy" in v},
               "curve": [r.get("test_accuracy") for r in doc["rounds"]],
               "mia": mia}
        row["mia_auc_mean"], row["mia_auc_max"] = _mia(mia, "records")
        row["mia_people_auc_mean"], row["mia_people_auc_max"] = _mia(mia, "people")
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("epsilon", "seconds", "epsilon_spent_max",
                                                "mia_auc_mean", "mia_auc_max",
                                                "mia_people_auc_mean", "mia_people_auc_max")}
                         | {"devtest": row["final"]["pairsDevTest"]["accuracy"]}), flush=True)
    summary = {"study": "DP-SGD privacy / utility on LFW (FedAvg, 8 institutions)",
               "rounds": args.rounds, "batch_size": args.batch_size,
               "image_size": args.image_size, "pairs": pairs.split(","),
               "seconds": round(time.time() - t_all, 1), "results": rows}
    write_json(args.out / f"{tag}.json", summary)
    (args.out / f"{tag}.md").write_text(markdown(summary))
    plot(rows, args.out / f"{tag}.png")
    print((args.out / f"{tag}.md").read_text())


def _eps(row: dict) -> float:
    """A row's epsilon; JSON keeps the non-private run as "inf" (or null)."""
    e = row["epsilon"]
    return math.inf if e in (None, "inf") else float(e)


def markdown(summary: dict) -> str:
    sets = summary["pairs"]
    head = " | ".join(f"{p.removesuffix('.txt')} acc %" for p in sets)
    lines = [f"# {summary['study']}", "",
             f"{summary['rounds']} rounds x 1 local epoch, batch {summary['batch_size']} "
             f"(Poisson), {summary['image_size']}px, tinyface + softmax heads, seed 0; "
             f"total {summary['seconds'] / 60:.0f} min. Membership inference: loss-threshold "
             "attack on each institution's model, AUC mean and max over institutions. "
             "Records: members are its training images, non-members held-out images of the "
             "same people (one per person with 3 or more images, never trained on). People: "
             "non-members are images of other people.", "",
             f"| epsilon | spent (max) | delta | {head} | MIA records mean | MIA records max "
             "| MIA people mean | MIA people max |",
             "|---|---|---|" + "---|" * len(sets) + "---|---|---|---|"]
    for r in summary["results"]:
        accs = " | ".join(f"{100 * r['final'][p.removesuffix('.txt')]['accuracy']:.1f} ± "
                          f"{100 * r['final'][p.removesuffix('.txt')]['accuracy_std']:.1f}"
                          for p in sets)
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.2f}"
        delta = "-" if r["delta"] is None else f"{r['delta']:g}"
        lines.append(f"| {_eps(r):g} | {spent} | {delta} | {accs} | "
                     f"{r['mia_auc_mean']:.3f} | {r['mia_auc_max']:.3f} | "
                     f"{r['mia_people_auc_mean']:.3f} | {r['mia_people_auc_max']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if not math.isinf(_eps(r))]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [_eps(r) for r in finite]
    for pset in rows[0]["final"]:
        (line,) = a1.plot(xs, [100 * r["final"][pset]["accuracy"] for r in finite], "o-",
                          label=pset)
        inf = [r for r in rows if math.isinf(_eps(r))]
        if inf:
            a1.axhline(100 * inf[0]["final"][pset]["accuracy"], ls="--", alpha=0.6,
                       color=line.get_color(), label=f"{pset}, no DP")
    a1.set(xscale="log", xlabel="epsilon (delta <= 1e-5)", ylabel="verification accuracy %",
           title="Utility vs privacy budget")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(xs, [r["mia_auc_mean"] for r in finite], "o-", label="records, mean")
    a2.plot(xs, [r["mia_auc_max"] for r in finite], "s--", label="records, max")
    a2.plot(xs, [r["mia_people_auc_mean"] for r in finite], "^:", label="people, mean")
    inf = [r for r in rows if math.isinf(_eps(r))]
    if inf:
        a2.axhline(inf[0]["mia_auc_mean"], ls=":", color="gray", label="no DP (mean)")
    a2.axhline(0.55, color="red", alpha=0.4, label="target 0.55")
    a2.set(xscale="log", xlabel="epsilon", ylabel="membership inference AUC",
           title="Loss-threshold attack")
    for ax in (a1, a2):
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
