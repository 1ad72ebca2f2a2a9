"""Study: what client-side anonymization costs federated face recognition.

Every institution anonymizes its own training images (run config ``anonymize=METHOD``,
``anonymize-preset=P``) before the federation trains; the model is tested on CLEAN
identity-disjoint pairs (what a recognizer trained on anonymized data still learns about
real faces). Settings:

- ``demo``: ``fedface demo``'s run (generated faces, 8 institutions), every method at every
  preset, beside the un-anonymized run;
- ``lfw``: LFW DevTrain held by 8 institutions, each anonymizing its own images, the
  model trained on their pooled data (``mode=centralized``, 64 px, 16 epochs: 82% on
  clean pairs, against 70 ± 5.5% for 16 federated rounds, whose seed spread would hide
  a few points of cost); every method at the medium preset, tested on ``pairsDevTest.txt``.

The cloak needs a surrogate model: the un-anonymized run's own model (trained first).

    python experiments/anonymize_training.py --setting demo     # ~25 min on 2 cores
    python experiments/anonymize_training.py --setting lfw      # ~25 min

Writes ``experiments/results/anonymize_training.json``, ``.md`` and ``.png`` (each setting
merged into the same files).
"""

from __future__ import annotations

import json
import time

import _study

from fedface.config import RunConfig
from fedface.metrics import RunDocument
from fedface.runner import run

TAG = "anonymize_training"
METHODS = ("blur", "mosaic", "mask", "dppix", "ksame", "cloak")


def settings(setting: str, lfw) -> dict:
    if setting == "demo":
        return {}
    return dict(data=str(lfw), train_people="peopleDevTrain.txt", pairs="pairsDevTest.txt",
                min_images=2, image_size=64, num_clients=8, partition="dirichlet",
                partition_alpha=1.0, mode="centralized", rounds=16, local_epochs=1, seed=0)


def main() -> None:
    ap = _study.parser(__doc__, lfw_help="LFW root (for --setting lfw)")
    ap.add_argument("--setting", choices=("demo", "lfw"), default="demo")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--presets", default=None, help="default: all for demo, medium for lfw")
    ap.add_argument("--again", action="store_true", help="rerun runs the result file has")
    args = _study.parse(ap)
    if args.setting == "lfw":
        _study.require_lfw(args.lfw)
    presets = (args.presets or ("low,medium,high" if args.setting == "demo" else "medium")).split(",")
    base = settings(args.setting, args.lfw)
    summary = _study.previous(args.out, TAG) or {"study": "client-side anonymization", "runs": {}}
    runs = summary["runs"].setdefault(args.setting, {})
    folder = args.out / TAG / args.setting

    def one(name: str, **anon) -> dict:
        cfg = RunConfig(**base, **anon, out=str(folder / name))
        t0 = time.time()
        doc = RunDocument(run(cfg))
        rep = next(iter(doc.final_reports().values()))
        row = {"anonymize": anon.get("anonymize", "none"),
               "preset": anon.get("anonymize_preset", "-"),
               "accuracy": rep["accuracy"], "accuracy_std": rep["accuracy_std"],
               "auc": rep["auc"], "tar_at_far_1e-3": rep["tar_at_far_1e-3"],
               "raw_pixels": rep.get("raw_pixels", {}).get("accuracy"),
               "wall_seconds": round(time.time() - t0, 1)}
        runs[name] = row
        # Re-read the file: a study of the other setting may have written it meanwhile.
        fresh = _study.previous(args.out, TAG) or summary
        fresh.setdefault("runs", {})[args.setting] = runs
        fresh.setdefault("config", {})[args.setting] = base
        print(name, json.dumps(row))
        _study.write_results(args.out, TAG, fresh, markdown)
        summary.update(fresh)
        return row

    if "none" not in runs:
        one("none")
    surrogate = folder / "none" / "model.pt"
    for method in args.methods.split(","):
        for preset in (presets if method != "mask" else ["medium"]):
            name = f"{method}-{preset}"
            if name in runs and not args.again:
                continue  # already in the result file (--again reruns it)
            options = f"surrogate={surrogate}" if method == "cloak" else ""
            one(name, anonymize=method, anonymize_preset=preset, anonymize_options=options)
    plot(summary, args.out / f"{TAG}.png")


def markdown(summary: dict) -> str:
    lines = [f"# {summary['study']}: accuracy on clean test pairs after training on "
             "anonymized data", "",
             "Each institution anonymizes its own images once before training "
             "(`--set anonymize=METHOD --set anonymize-preset=P`); the test pairs stay clean. "
             "`demo`: `fedface demo` (generated faces, 8 institutions, 10 rounds); `lfw`: LFW "
             "DevTrain held by 8 institutions that each anonymize their images, trained on the "
             "pooled data (centralized, 64 px, 16 epochs), tested on pairsDevTest.txt. "
             "Cloak: against the un-anonymized run's model as surrogate.", "",
             "| setting | method | preset | accuracy % | AUC | TAR@FAR=1e-3 % | vs none | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, runs in summary["runs"].items():
        ref = runs.get("none", {}).get("accuracy")
        for name, r in runs.items():
            delta = "-" if ref is None or name == "none" else f"{100 * (r['accuracy'] - ref):+.1f}"
            lines.append(f"| {setting} | {r['anonymize']} | {r['preset']} | "
                         f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} | "
                         f"{r['auc']:.3f} | {100 * r['tar_at_far_1e-3']:.1f} | {delta} | "
                         f"{r['wall_seconds']:.0f} |")
        raw = runs.get("none", {}).get("raw_pixels")
        if raw is not None:
            lines.append(f"| {setting} | raw pixels (no training) | - | {100 * raw:.1f} | | | | |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path) -> None:
    settings_ = list(summary["runs"])
    fig, axes = _study.subplots(1, len(settings_), figsize=(6 * len(settings_), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings_, strict=True):
        runs = summary["runs"][setting]
        names = list(runs)
        acc = [100 * runs[n]["accuracy"] for n in names]
        ax.bar(range(len(names)), acc, color=["0.4" if n == "none" else "tab:blue" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("clean-pair accuracy %")
        ax.set_ylim(40, 100)
        ax.set_title(f"{setting}: trained on anonymized data")
    _study.save_figure(fig, path)


if __name__ == "__main__":
    main()
