"""Study: privacy / utility of client-side DP-SGD on LFW, and the membership-inference audit.

FedAvg (``--strategy`` picks another) across 8 institutions holding LFW
``peopleDevTrain.txt`` identities (identity-
disjoint, near-equal sizes: Dirichlet(100), so that every institution can Poisson-sample
batches of 32), every institution training with DP-SGD under the budget epsilon for all
rounds, at delta = min(1e-5, 1/(10 N)); epsilon = inf is the same run without DP.
Reported per epsilon: ``pairsDevTest.txt`` and 10-fold ``pairs.txt`` accuracy, the
epsilon actually spent (PRV accountant), and the AUC of a loss-threshold membership
inference attack on each institution's final model (global backbone + its own head):
members are its training images; non-members are held-out images of the same people
(``holdout-images=1``: record-level, what image-level DP-SGD bounds) and images of other
people (its private validation identities: person-level, what ``dp-unit=person`` bounds).
Both privacy units are run: ``image`` (each image is a record) and ``person`` (each
person with all their images; batch 32 people, at most 2 images each per step).

    python experiments/dp.py            # full: 16 rounds, both pair sets, both units
    python experiments/dp.py --quick    # 3 rounds, pairsDevTest: under 10 min on 2 cores
    python experiments/dp.py --units person --epsilons 8 --seeds 1,2 --append

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
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--strategy", default="fedavg",
                    help="aggregation strategy (fedface train --strategy)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of the existing result file (same settings), adding or "
                         "replacing the (unit, epsilon, seed) rows run now")
    ap.add_argument("--units", default="image,person",
                    help="privacy units to run: image (record-level), person")
    ap.add_argument("--person-images", type=int, default=2,
                    help="dp-unit=person: images a sampled person brings to a step")
    ap.add_argument("--quick", action="store_true", help="3 rounds, pairsDevTest only")
    ap.add_argument("--tag", default="", help="name of the result files (default dp[_quick])")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not (args.lfw / "pairsDevTest.txt").exists():
        raise SystemExit(f"LFW not found at {args.lfw}: pass --lfw PATH")
    units = [u.strip() for u in args.units.split(",")]
    if set(units) - {"image", "person"}:
        raise SystemExit(f"--units {args.units}: choose from image, person")
    if args.quick:
        args.rounds = 3
    pairs = "pairsDevTest.txt" if args.quick else "pairsDevTest.txt,pairs.txt"
    tag = args.tag or ("dp_quick" if args.quick else "dp")
    # The non-private run is the same for both units: once per seed.
    grid = [(u, float(e), int(s)) for s in args.seeds.split(",") for e in args.epsilons.split(",")
            for u in (units if math.isfinite(float(e)) else ["none"])]
    rows, t_all, earlier_seconds = [], time.time(), 0.0
    if args.append and (args.out / f"{tag}.json").exists():
        old = json.loads((args.out / f"{tag}.json").read_text())
        same = {"rounds": args.rounds, "batch_size": args.batch_size,
                "image_size": args.image_size, "strategy": args.strategy}
        differ = {k: (old.get(k, "fedavg" if k == "strategy" else None), v)
                  for k, v in same.items() if old.get(k, "fedavg" if k == "strategy" else None) != v}
        if differ:
            raise SystemExit(f"--append: {tag}.json was run with other settings "
                             f"(theirs, these): {differ}")
        for r in old["results"]:  # files of before the unit and seed columns
            r.setdefault("unit", "none" if _eps(r) == math.inf else "image")
            r.setdefault("seed", 0)
        now = {(u, e, s) for u, e, s in grid}
        rows = [r for r in old["results"] if (r["unit"], _eps(r), r["seed"]) not in now]
        earlier_seconds = float(old.get("seconds", 0.0))
    for unit, eps, seed in grid:
        cfg = RunConfig(
            data=str(args.lfw), train_people="peopleDevTrain.txt", pairs=pairs,
            image_size=args.image_size, num_clients=args.clients, partition="dirichlet",
            partition_alpha=100.0, rounds=args.rounds, local_epochs=1,
            batch_size=args.batch_size, seed=seed, min_train_nodes=args.clients,
            holdout_images=1, strategy=args.strategy,
            dp_epsilon=0.0 if math.isinf(eps) else eps,
            dp_unit="person" if unit == "person" else "image",
            dp_person_images=args.person_images,
            out=str(args.out / tag / f"{unit}-eps-{eps:g}-s{seed}"))
        # A fresh study: the run folder holds the clients' privacy ledgers of any earlier
        # study, which would (rightly) refuse to spend the budget again.
        shutil.rmtree(cfg.out, ignore_errors=True)
        t0 = time.time()
        doc = run(cfg)
        mia = audit(cfg)
        spent = doc["rounds"][-1].get("dp", {}).get("epsilon_spent", {})
        row = {"unit": unit, "seed": seed,
               "epsilon": eps if math.isfinite(eps) else "inf", "seconds": round(time.time() - t0, 1),
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
        print(json.dumps({k: row[k] for k in ("unit", "seed", "epsilon", "seconds", "epsilon_spent_max",
                                                "mia_auc_mean", "mia_auc_max",
                                                "mia_people_auc_mean", "mia_people_auc_max")}
                         | {"devtest": row["final"]["pairsDevTest"]["accuracy"]}), flush=True)
    rows.sort(key=lambda r: (r["unit"] == "none", r["unit"], _eps(r), r["seed"]))
    summary = {"study": f"DP-SGD privacy / utility on LFW ({args.strategy}, 8 institutions)",
               "strategy": args.strategy, "rounds": args.rounds, "batch_size": args.batch_size,
               "person_images": args.person_images,
               "seeds": ",".join(str(x) for x in sorted({r["seed"] for r in rows})),
               "image_size": args.image_size, "pairs": pairs.split(","),
               "seconds": round(earlier_seconds + time.time() - t_all, 1), "results": rows}
    write_json(args.out / f"{tag}.json", summary)
    (args.out / f"{tag}.md").write_text(markdown(summary))
    plot(rows, args.out / f"{tag}.png")
    print((args.out / f"{tag}.md").read_text())


def _eps(row: dict) -> float:
    """A row's epsilon; JSON keeps the non-private run as "inf" (or null)."""
    e = row["epsilon"]
    return math.inf if e in (None, "inf") else float(e)


def groups(rows: list[dict]) -> list[tuple[str, float, list[dict]]]:
    """Rows grouped by (unit, epsilon) over seeds: DP units first, the no-DP run last."""
    keys = sorted({(r["unit"], _eps(r)) for r in rows},
                  key=lambda k: (k[0] == "none", k[0], k[1]))
    return [(u, e, [r for r in rows if r["unit"] == u and _eps(r) == e]) for u, e in keys]


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def markdown(summary: dict) -> str:
    sets = summary["pairs"]
    head = " | ".join(f"{p.removesuffix('.txt')} acc %" for p in sets)
    lines = [f"# {summary['study']}", "",
             f"{summary['rounds']} rounds x 1 local epoch, batch {summary['batch_size']} "
             f"(Poisson; images, or people with at most {summary.get('person_images', 2)} "
             f"images each), {summary['image_size']}px, tinyface + softmax heads, seeds "
             f"{summary.get('seeds', '0')}; total {summary['seconds'] / 60:.0f} min. "
             "Unit: what the budget protects (image: each training image; person: each "
             "person with all their images). Membership inference: loss-threshold attack on "
             "each institution's model (global backbone + its head), AUC mean and max over "
             "institutions (mean ± std over seeds where there are several). Records: members "
             "are its training images, non-members held-out images of the same people (one "
             "per person with 3 or more images, never trained on). People: non-members are "
             "images of other people.", "",
             f"| unit | epsilon | seeds | spent (max) | delta | {head} | MIA records mean | "
             "MIA records max | MIA people mean | MIA people max |",
             "|---|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|"]
    for unit, eps, group in groups(summary["results"]):
        accs = []
        for p in sets:
            m, _ = _mean_std([r["final"][p.removesuffix(".txt")]["accuracy"] for r in group])
            fold = np.mean([r["final"][p.removesuffix(".txt")]["accuracy_std"] for r in group])
            accs.append(f"{100 * m:.1f} ± {100 * fold:.1f}")
        spent = [r["epsilon_spent_max"] for r in group if r["epsilon_spent_max"] is not None]
        deltas = [r["delta"] for r in group if r["delta"] is not None]
        cells = []
        for key in ("mia_auc_mean", "mia_auc_max", "mia_people_auc_mean", "mia_people_auc_max"):
            m, sd = _mean_std([r[key] for r in group])
            cells.append(f"{m:.3f}" + (f" ± {sd:.3f}" if len(group) > 1 else ""))
        spent_s = f"{max(spent):.2f}" if spent else "-"
        delta_s = f"{max(deltas):g}" if deltas else "-"
        lines.append(" | ".join([f"| {unit}", f"{eps:g}", str(len(group)), spent_s, delta_s,
                                 *accs, *cells]) + " |")
    lines += ["", "Accuracy: mean over seeds ± the 10-fold spread of one run."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = groups(rows)
    nodp = [g for u, _, g in table if u == "none"]
    pset = next(iter(rows[0]["final"]))
    xs_all = sorted({e for u, e, _ in table if u != "none"})
    for unit, marker in (("image", "o"), ("person", "s")):
        series = [(e, g) for u, e, g in table if u == unit]
        if not series:
            continue
        xs = [e for e, _ in series]
        for p in rows[0]["final"]:
            a1.plot(xs, [100 * np.mean([r["final"][p]["accuracy"] for r in g]) for _, g in series],
                    marker + "-", label=f"{p}, {unit}-level DP")
        a2.plot(xs, [np.mean([r["mia_people_auc_mean"] for r in g]) for _, g in series],
                marker + "-", label=f"people audit, {unit}-level DP")
        a2.plot(xs, [np.mean([r["mia_auc_mean"] for r in g]) for _, g in series],
                marker + ":", label=f"records audit, {unit}-level DP")
    if nodp:
        g = nodp[0]
        a1.axhline(100 * np.mean([r["final"][pset]["accuracy"] for r in g]), ls="--",
                   color="gray", label=f"{pset}, no DP")
        a2.axhline(np.mean([r["mia_people_auc_mean"] for r in g]), ls="--", color="gray",
                   label="people audit, no DP")
    a1.set(xscale="log", xlabel="epsilon (delta <= 1e-5)", ylabel="verification accuracy %",
           title="Utility vs privacy budget")
    a2.axhline(0.55, color="red", alpha=0.4, label="target 0.55")
    a2.set(xscale="log", xlabel="epsilon", ylabel="membership inference AUC (mean)",
           title="Loss-threshold attack")
    for ax in (a1, a2):
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
