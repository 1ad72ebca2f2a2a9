"""Study: privacy / utility of client-side DP-SGD on LFW, and the membership-inference audit.

FedAvg (``--strategy`` picks another) across 8 institutions holding LFW
``peopleDevTrain.txt`` identities (identity-
disjoint, near-equal sizes: Dirichlet(100), so that every institution can Poisson-sample
batches of 32), every institution training with DP-SGD under the budget epsilon for all
rounds, at delta = min(1e-5, 1/(10 N)); epsilon = inf is the same run without DP.
Reported per epsilon: ``pairsDevTest.txt`` and 10-fold ``pairs.txt`` accuracy, the
epsilon actually spent (PRV accountant), and the AUC of loss-threshold membership
inference attacks on each institution's final model (global backbone + its own head),
:func:`fedface.privacy.audit_run`: ``records`` (what image-level DP-SGD bounds): training
images against held-out images of the same people (``holdout-images=1``), matched
person by person, scored by the true-label loss; ``people`` (what ``dp-unit=person``
bounds): training images against images of other people (its private validation
identities), scored label-free (other people have no class in the head).
Both privacy units are run: ``image`` (each image is a record) and ``person`` (each
person with all their images; batch 32 people, at most 2 images each per step).

    python experiments/dp.py            # full: 16 rounds, both pair sets, both units
    python experiments/dp.py --quick    # 3 rounds, pairsDevTest: under 10 min on 2 cores
    python experiments/dp.py --units person --epsilons 8 --seeds 1,2 --append
    python experiments/dp.py --audit-only   # re-audit the kept run folders, no training

Writes ``experiments/results/dp[_quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import _study
import numpy as np

from fedface.config import RunConfig
from fedface.metrics import RunDocument
from fedface.privacy import AUDIT_VERSION, audit_run
from fedface.privacy.attacks import LABEL_FREE, TRUE_LABEL
from fedface.runner import run

# The attacks of each audit (see fedface.privacy.audit): records has labels, people has not.
ATTACKS = {"records": (TRUE_LABEL, *LABEL_FREE), "people": LABEL_FREE}


def audit_fields(cfg: RunConfig) -> dict:
    """A run's membership audit (:func:`fedface.privacy.audit_run`) and its summary columns."""
    mia = audit_run(cfg)
    row = {"audit": AUDIT_VERSION, "mia": mia}
    row["mia_auc_mean"], row["mia_auc_max"] = _mia(mia, "records")
    row["mia_people_auc_mean"], row["mia_people_auc_max"] = _mia(mia, "people")
    row["mia_by_loss"] = {
        kind: {loss: float(np.mean([r[kind]["by_loss"][loss]["auc"] for r in mia if kind in r]))
               for loss in losses if any(kind in r for r in mia)}
        for kind, losses in ATTACKS.items()}
    return row


def _mia(rows: list[dict], kind: str) -> tuple[float | None, float | None]:
    aucs = [r[kind]["auc"] for r in rows if kind in r]
    return (float(np.mean(aucs)), float(np.max(aucs))) if aucs else (None, None)


def main() -> None:
    ap = _study.parser(__doc__)
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
    ap.add_argument("--audit-only", action="store_true",
                    help="no training: re-run the membership audit of the (unit, epsilon, seed) "
                         "rows already in the result file, from their kept run folders")
    ap.add_argument("--units", default="image,person",
                    help="privacy units to run: image (record-level), person")
    ap.add_argument("--person-images", type=int, default=2,
                    help="dp-unit=person: images a sampled person brings to a step")
    ap.add_argument("--quick", action="store_true", help="3 rounds, pairsDevTest only")
    ap.add_argument("--tag", default="", help="name of the result files (default dp[_quick])")
    args = _study.parse(ap)
    _study.require_lfw(args.lfw)
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
    old = _study.previous(args.out, tag) if args.append or args.audit_only else None
    if args.audit_only and old is None:
        raise SystemExit(f"--audit-only: no {tag}.json in {args.out} to re-audit")
    if old is not None:
        same = {"rounds": args.rounds, "batch_size": args.batch_size,
                "image_size": args.image_size, "strategy": args.strategy}
        differ = _study.changed_settings(old, same, defaults={"strategy": "fedavg"})
        if differ:
            raise SystemExit(f"--{'audit-only' if args.audit_only else 'append'}: {tag}.json was "
                             f"run with other settings (theirs, these): {differ}")
        for r in old["results"]:  # files of before the unit and seed columns
            r.setdefault("unit", "none" if _eps(r) == math.inf else "image")
            r.setdefault("seed", 0)
        now = {(u, e, s) for u, e, s in grid}
        earlier_seconds = float(old.get("seconds", 0.0))
        rows = [r for r in old["results"] if (r["unit"], _eps(r), r["seed"]) not in now]
        # Rows kept as they are must have been audited by this audit: AUCs of another
        # attack or other pools do not compare.
        stale = sorted({(r["unit"], _eps(r), r["seed"]) for r in rows
                        if r.get("audit") != AUDIT_VERSION})
        if stale:
            raise SystemExit(f"{tag}.json: rows {stale} were audited by another membership attack "
                             f"(audit version {AUDIT_VERSION} now): re-audit them with --audit-only "
                             "(from their kept run folders) or rerun them")
        if args.audit_only:
            redo = [r for r in old["results"] if (r["unit"], _eps(r), r["seed"]) in now]
            missing = now - {(r["unit"], _eps(r), r["seed"]) for r in redo}
            if missing:
                print(f"--audit-only: {sorted(missing)} not in {tag}.json: not run", flush=True)
            cfgs = [study_config(args, pairs, tag, r["unit"], _eps(r), r["seed"]) for r in redo]
            gone = [c.out for c in cfgs if not (Path(c.out) / "model.pt").exists()]
            if gone:
                raise SystemExit(f"--audit-only: no run folder (model.pt) at {gone}: rerun those rows")
            for r, cfg in zip(redo, cfgs, strict=True):
                r.update(audit_fields(cfg))
                print(json.dumps(_brief(r)), flush=True)
            rows, grid = rows + redo, []
    for unit, eps, seed in grid:
        cfg = study_config(args, pairs, tag, unit, eps, seed)
        # A fresh study: the run folder holds the clients' privacy ledgers of any earlier
        # study, which would (rightly) refuse to spend the budget again.
        shutil.rmtree(cfg.out, ignore_errors=True)
        t0 = time.time()
        result = RunDocument(run(cfg))
        plans = result.dp_plans.values()
        row = {"unit": unit, "seed": seed,
               "epsilon": eps if math.isfinite(eps) else "inf", "seconds": round(time.time() - t0, 1),
               "epsilon_spent_max": max(result.dp_spent().values(), default=None),
               "delta": max((p["delta"] for p in plans), default=None),
               "noise_multiplier": [p["noise_multiplier"] for p in plans],
               "final": {k: {f: v[f] for f in ("accuracy", "accuracy_std", "auc")}
                         for k, v in result.final_reports().items()},
               "curve": result.test_curve(),
               **audit_fields(cfg)}
        rows.append(row)
        print(json.dumps(_brief(row)), flush=True)
    rows.sort(key=lambda r: (r["unit"] == "none", r["unit"], _eps(r), r["seed"]))
    summary = {"study": f"DP-SGD privacy / utility on LFW ({args.strategy}, 8 institutions)",
               "strategy": args.strategy, "rounds": args.rounds, "batch_size": args.batch_size,
               "person_images": args.person_images,
               "seeds": ",".join(str(x) for x in sorted({r["seed"] for r in rows})),
               "image_size": args.image_size, "pairs": pairs.split(","),
               "seconds": round(earlier_seconds + time.time() - t_all, 1), "results": rows}
    text = _study.write_results(args.out, tag, summary, markdown)
    plot(rows, args.out / f"{tag}.png")
    print(text)


def study_config(args: argparse.Namespace, pairs: str, tag: str, unit: str, eps: float,
                 seed: int) -> RunConfig:
    """The run of one (unit, epsilon, seed) row, in ``OUT/TAG/<unit>-eps-<eps>-s<seed>``."""
    return RunConfig(
        data=str(args.lfw), train_people="peopleDevTrain.txt", pairs=pairs,
        image_size=args.image_size, num_clients=args.clients, partition="dirichlet",
        partition_alpha=100.0, rounds=args.rounds, local_epochs=1,
        batch_size=args.batch_size, seed=seed, min_train_nodes=args.clients,
        holdout_images=1, strategy=args.strategy,
        dp_epsilon=0.0 if math.isinf(eps) else eps,
        dp_unit="person" if unit == "person" else "image",
        dp_person_images=args.person_images,
        out=str(args.out / tag / f"{unit}-eps-{eps:g}-s{seed}"))


def _brief(row: dict) -> dict:
    return ({k: row[k] for k in ("unit", "seed", "epsilon", "seconds", "epsilon_spent_max",
                                 "mia_auc_mean", "mia_auc_max", "mia_people_auc_mean",
                                 "mia_people_auc_max")}
            | {"devtest": row["final"]["pairsDevTest"]["accuracy"]})


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


def _cell(values: list) -> str:
    """Mean (± std over seeds where there are several) of the values present, else "-"."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m, sd = _mean_std(values)
    return f"{m:.3f}" + (f" ± {sd:.3f}" if len(values) > 1 else "")


def _pool_sizes(rows: list[dict], kind: str) -> tuple[float, float] | None:
    sizes = [(a[kind]["members"], a[kind]["non_members"]) for r in rows for a in r.get("mia", [])
             if kind in a]
    return tuple(np.mean(sizes, axis=0)) if sizes else None


def markdown(summary: dict) -> str:
    sets = summary["pairs"]
    head = " | ".join(f"{p.removesuffix('.txt')} acc %" for p in sets)
    rec, ppl = _pool_sizes(summary["results"], "records"), _pool_sizes(summary["results"], "people")
    # Standard error of one institution's AUC when the attack cannot tell (Mann-Whitney).
    se = (f" (one institution's records AUC has a standard error of about "
          f"{math.sqrt((rec[0] + rec[1] + 1) / (12 * rec[0] * rec[1])):.2f} at 0.5)" if rec else "")
    sizes = (f"About {rec[0]:.0f} members and {rec[1]:.0f} non-members per institution for records"
             f"{se}, {ppl[0]:.0f} and {ppl[1]:.0f} for people. " if rec and ppl else "")
    lines = [f"# {summary['study']}", "",
             f"{summary['rounds']} rounds x 1 local epoch, batch {summary['batch_size']} "
             f"(Poisson; images, or people with at most {summary.get('person_images', 2)} "
             f"images each), {summary['image_size']}px, tinyface + softmax heads, seeds "
             f"{summary.get('seeds', '0')}; total {summary['seconds'] / 60:.0f} min. "
             "Unit: what the budget protects (image: each training image; person: each "
             "person with all their images).", "",
             "Membership inference (`fedface.privacy.audit_run`, audit version "
             f"{AUDIT_VERSION}): loss-threshold attacks (Yeom et al. 2018) on each institution's "
             "model (global backbone + its own head); AUC mean and max over institutions "
             "(mean ± std over seeds where there are several); 0.5: the attack cannot tell. "
             "**Records**: members are training images, non-members held-out images of the same "
             "people (one per person with 3 or more images, never trained on); only people with "
             "a held-out image take part, each with as many training images as held-out ones, so "
             "both sides hold the same people. Scored by the true-label loss (cross-entropy at "
             "the image's own class). **People**: members are training images of the "
             "institution's people, non-members images of other people (its validation "
             "identities, trained on by no institution), at most 2 images a person on either "
             "side. Other people have no class in the head, so there is no true-label loss: "
             "scored label-free, by the stronger (per institution, picked after the fact, so "
             "slightly above 0.5 at chance) of the cross-entropy at the most likely class and "
             f"the cosine distance to the nearest class weight. {sizes}"
             "The second table has every attack.", "",
             f"| unit | epsilon | seeds | spent (max) | delta | {head} | MIA records mean | "
             "MIA records max | MIA people mean | MIA people max |",
             "|---|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|"]
    attacks = [(kind, loss) for kind, losses in ATTACKS.items() for loss in losses]
    every = ["", "Every attack: AUC mean over institutions (mean ± std over seeds); records "
             "`true_label` and people's stronger label-free loss are the table's headline.", "",
             "| unit | epsilon | " + " | ".join(f"{k} {loss}" for k, loss in attacks) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for unit, eps, group in groups(summary["results"]):
        accs = []
        for p in sets:
            m, _ = _mean_std([r["final"][p.removesuffix(".txt")]["accuracy"] for r in group])
            fold = np.mean([r["final"][p.removesuffix(".txt")]["accuracy_std"] for r in group])
            accs.append(f"{100 * m:.1f} ± {100 * fold:.1f}")
        spent = [r["epsilon_spent_max"] for r in group if r["epsilon_spent_max"] is not None]
        deltas = [r["delta"] for r in group if r["delta"] is not None]
        cells = [_cell([r[key] for r in group]) for key in
                 ("mia_auc_mean", "mia_auc_max", "mia_people_auc_mean", "mia_people_auc_max")]
        spent_s = f"{max(spent):.2f}" if spent else "-"
        delta_s = f"{max(deltas):g}" if deltas else "-"
        lines.append(" | ".join([f"| {unit}", f"{eps:g}", str(len(group)), spent_s, delta_s,
                                 *accs, *cells]) + " |")
        every.append(" | ".join([f"| {unit}", f"{eps:g}", *(
            _cell([r.get("mia_by_loss", {}).get(k, {}).get(loss) for r in group])
            for k, loss in attacks)]) + " |")
    lines += ["", "Accuracy: mean over seeds ± the 10-fold spread of one run.", *every]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig, (a1, a2) = _study.subplots(1, 2, figsize=(12, 4.5))
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
                marker + "-", label=f"people (label-free), {unit}-level DP")
        a2.plot(xs, [np.mean([r["mia_auc_mean"] for r in g]) for _, g in series],
                marker + ":", label=f"records (true label), {unit}-level DP")
    if nodp:
        g = nodp[0]
        a1.axhline(100 * np.mean([r["final"][pset]["accuracy"] for r in g]), ls="--",
                   color="gray", label=f"{pset}, no DP")
        a2.axhline(np.mean([r["mia_people_auc_mean"] for r in g]), ls="--", color="gray",
                   label="people (label-free), no DP")
        a2.axhline(np.mean([r["mia_auc_mean"] for r in g]), ls=":", color="gray",
                   label="records (true label), no DP")
    a1.set(xscale="log", xlabel="epsilon (delta <= 1e-5)", ylabel="verification accuracy %",
           title="Utility vs privacy budget")
    a2.axhline(0.55, color="red", alpha=0.4, label="target 0.55")
    a2.set(xscale="log", xlabel="epsilon", ylabel="membership inference AUC (mean)",
           title="Membership inference (loss threshold)")
    for ax in (a1, a2):
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _study.save_figure(fig, path)


if __name__ == "__main__":
    main()
