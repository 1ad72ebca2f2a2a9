"""``fedface bench unlearnable``: does a recognizer learn the people from protected images?

On the LFW people with at least 10 images (158, at most 30 images each; ``--quick``: 40, at
most 20 each), each person's images are split into training images (protected) and
held-out images (kept clean). The training images
go through the product's own path, :func:`fedface.unlearnable.files.protect_tree`: aligned,
noised, carried back into the full 250 x 250 images and written as PNG; the adversary then
detects and aligns the protected files again. Identification models are trained on clean and
on protected training images of the same people and scored (top-1) on their clean held-out
images, with the surrogate's architecture and with another backbone; the ratio
``protected_over_clean`` is the figure (target at most 0.2). The adversary's counter-measures
are rows of their own, reported whether the protection holds or not: grayscale, JPEG 10 and
50, standard augmentation, adversarial training, and 20 % clean images mixed in. The
identification backbones are also scored on LFW's ``pairsDevTest.txt`` verification pairs
(those not showing any of the bench's people).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["bench_unlearnable", "markdown"]

TARGET = 0.2


def _split(ds, identities: int | None, cap: int, seed: int = 0):
    """Training and held-out indices: per person at most ``cap`` images, 30 % (>= 3) held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    groups = list(ds.by_identity().items())
    if identities is not None:
        groups = groups[:identities]
    for _label, idx in groups:
        idx = rng.permutation(idx)[:cap]
        k = max(3, int(round(0.3 * len(idx))))
        test += list(idx[:k])
        train += list(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def _link_tree(ds, idx, root: Path) -> None:
    """The training images as identity folders of links (the shared data stays in place)."""
    for i in idx:
        p = ds.paths[i]
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), root / p.parent.name / p.name)


def bench_unlearnable(data: str | Path, quick: bool = False, surrogate: str = "tinyface",
                      other: str = "mobilefacenet", image_size: int = 48,
                      log: Callable[[str], None] = print) -> dict:
    import torch

    from fedface.config.run import default_cache_dir
    from fedface.data.align import AlignConfig, FaceAligner
    from fedface.data.datasets import load_dataset
    from fedface.data.images import load_image
    from fedface.unlearnable import evaluate as ev
    from fedface.unlearnable.files import protect_tree
    from fedface.unlearnable.noise import NoiseConfig

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t_start = time.time()
    ds = load_dataset(data).filter_min_images(10)
    people, cap = (40, 20) if quick else (None, 30)
    train_idx, test_idx = _split(ds, people, cap)
    present = np.unique(ds.labels[train_idx])
    remap = np.full(ds.num_identities, -1)
    remap[present] = np.arange(len(present))
    y_train, y_test = remap[ds.labels[train_idx]], remap[ds.labels[test_idx]]
    classes = len(present)
    settings = ev.TrainSettings(epochs=30)
    other_settings = ev.TrainSettings(epochs=15)
    max_iterations = 10 if quick else 20
    log(f"{classes} people, {len(train_idx)} training and {len(test_idx)} held-out images, "
        f"{image_size} px")

    align = AlignConfig.for_layout("lfw", size=image_size)
    cached = FaceAligner(align, default_cache_dir())
    x_train, _, _ = cached.align_files([ds.paths[i] for i in train_idx])
    x_test, _, _ = cached.align_files([ds.paths[i] for i in test_idx])

    rows: list[dict] = []
    models: dict = {}

    def train(arch, x, name, **kw):
        s = other_settings if arch == other else settings
        t0 = time.time()
        test = kw.pop("test", None)
        bb, hd = ev.train_identifier(arch, x, y_train, classes, s, **kw)
        acc = ev.top1(bb, hd, x_test if test is None else test, y_test)
        log(f"  {name}, {arch}: top-1 {acc:.3f} ({time.time() - t0:.0f} s)")
        models[(name, arch)] = bb
        return acc

    def row(name, mode, arch, clean, protected, note=""):
        r = {"row": name, "mode": mode, "arch": arch, "clean_top1": round(clean, 4),
             "protected_top1": round(protected, 4),
             "protected_over_clean": round(protected / clean, 4) if clean > 0 else None,
             "holds": bool(clean > 0 and protected / clean <= TARGET)}
        if note:
            r["note"] = note
        rows.append(r)
        log(f"{name}: {r['protected_over_clean']} ({'holds' if r['holds'] else 'broken'})")
        return r

    noise: dict = {}
    protected: dict = {}
    with tempfile.TemporaryDirectory(prefix="fedface-unlearnable-") as tmp:
        src = Path(tmp) / "in"
        _link_tree(ds, train_idx, src)
        for mode in ("sample", "class"):
            dst = Path(tmp) / f"out-{mode}"
            cfg = NoiseConfig(mode=mode, image_size=image_size, surrogate=surrogate,
                              max_iterations=max_iterations)
            log(f"protecting {len(train_idx)} images ({mode}-wise)")
            doc = protect_tree(src, dst, cfg, align=align, cache_dir=Path(tmp) / "cache")
            outputs = {e["source"]: name for name, e in doc["images"].items()}
            rel = [f"{ds.paths[i].parent.name}/{ds.paths[i].name}" for i in train_idx]
            files = [dst / outputs[r] for r in rel]
            x_prot, kept, _ = FaceAligner(align).align_files(files)  # the adversary re-detects
            if not kept.all():
                raise RuntimeError(f"{(~kept).sum()} protected images could not be read back")
            protected[mode] = x_prot
            some = list(range(0, len(rel), max(1, len(rel) // 300)))
            quality = ev.image_quality([load_image(src / rel[i]) for i in some],
                                       [load_image(files[i]) for i in some])
            diff = np.abs(x_prot.astype(np.int16) - x_train)
            noise[mode] = {
                "iterations": doc["stop"]["iterations"], "reached": doc["stop"]["reached"],
                "condition": doc["stop"]["condition"],
                "surrogate_accuracy": round(doc["stop"]["train_accuracy"], 4),
                "seconds_per_image": doc["seconds_per_image"],
                "max_perturbation": round(doc["max_perturbation"], 5),
                "max_perturbation_levels": round(doc["max_perturbation"] * 255),
                # what the adversary's chips differ by: the noise after the round trip, plus
                # re-detection's small shifts of the face
                "mean_abs_change_realigned_chip": round(float(diff.mean()) / 255, 5),
                **quality}
            log(f"  {noise[mode]}")

        log("training the adversary's models")
        clean = train(surrogate, x_train, "clean")
        prot = train(surrogate, protected["sample"], "protected")
        main = row("surrogate architecture", "sample", surrogate, clean, prot)
        clean_o = train(other, x_train, "clean")
        prot_o = train(other, protected["sample"], "protected")
        other_row = row("other architecture", "sample", other, clean_o, prot_o)
        cls = row("class-wise, surrogate architecture", "class", surrogate, clean,
                  train(surrogate, protected["class"], "class-wise"))
        if not quick:
            row("class-wise, other architecture", "class", other, clean_o,
                train(other, protected["class"], "class-wise"))

        xp = protected["sample"]
        grey_test = ev.grayscale(x_test)
        row("grayscale (training and test images)", "sample", surrogate,
            train(surrogate, ev.grayscale(x_train), "clean grey", test=grey_test),
            train(surrogate, ev.grayscale(xp), "protected grey", test=grey_test))
        for q in (10, 50):
            row(f"JPEG quality {q}", "sample", surrogate,
                train(surrogate, ev.jpeg(x_train, q), f"clean jpeg{q}"),
                train(surrogate, ev.jpeg(xp, q), f"protected jpeg{q}"))
        row("standard augmentation (crop, flip, colour jitter)", "sample", surrogate,
            train(surrogate, x_train, "clean aug", augmentation=ev.strong_augment),
            train(surrogate, xp, "protected aug", augmentation=ev.strong_augment))
        row("adversarial training (PGD 8/255, 3 steps)", "sample", surrogate,
            train(surrogate, x_train, "clean adv", adversarial=True),
            train(surrogate, xp, "protected adv", adversarial=True))
        rng = np.random.default_rng(1)
        clean_part = rng.random(len(xp)) < 0.2
        mixed = np.where(clean_part[:, None, None, None], x_train, xp)
        only = _train_subset(ev, surrogate, x_train[clean_part], y_train[clean_part], classes,
                             settings, x_test, y_test)
        row("20 % clean + 80 % protected", "sample", surrogate, clean,
            train(surrogate, mixed, "mixed"),
            note=f"the clean 20 % alone: top-1 {only:.3f}")

    verification = _verification(ds, data, present_names=[ds.identities[i] for i in present],
                                 align=align, cached=cached,
                                 backbones={"clean": models[("clean", surrogate)],
                                            "protected": models[("protected", surrogate)]},
                                 log=log)
    return {
        "benchmark": "unlearnable", "quick": quick,
        "data": "LFW, people with at least 10 images",
        "people": classes, "train_images": int(len(train_idx)),
        "test_images": int(len(test_idx)), "image_size": image_size,
        "surrogate": surrogate, "other_backbone": other,
        "epochs": {surrogate: settings.epochs, other: other_settings.epochs},
        "protected_over_clean": main["protected_over_clean"],
        "protected_over_clean_other": other_row["protected_over_clean"],
        "class_wise_protected_over_clean": cls["protected_over_clean"],
        "target": TARGET, "noise": noise, "rows": rows, "verification": verification,
        "seconds": round(time.time() - t_start, 1),
    }


def _train_subset(ev, arch, x, y, classes, settings, x_test, y_test) -> float:
    bb, hd = ev.train_identifier(arch, x, y, classes, settings)
    return ev.top1(bb, hd, x_test, y_test)


def _verification(ds, data, present_names, align, cached, backbones, log) -> dict:
    """The identification backbones on LFW's DevTest pairs that show none of the bench's
    people (10-fold accuracy and AUC)."""
    from fedface.data.datasets import find_images_root
    from fedface.data.pairs import read_pairs
    from fedface.data.prepare import build_pairset
    from fedface.data.report import DataReport
    from fedface.training import raw_pixel_pairs, verify_pairs

    pf = Path(data) / "pairsDevTest.txt"
    if not pf.exists():
        return {"skipped": "no pairsDevTest.txt in the data folder"}
    names = set(present_names)
    pairs = [p for p in read_pairs(pf, find_images_root(data))
             if Path(p.a).parent.name not in names and Path(p.b).parent.name not in names]
    ps = build_pairset(pf, pairs, cached, DataReport(), None)
    out = {"pairs": len(ps), "excluded": "pairs showing any of the bench's people"}
    for name, bb in backbones.items():
        rep = verify_pairs(bb, ps.images, ps.a, ps.b, ps.same, ps.folds)
        out[name] = {"accuracy": round(rep["accuracy"], 4), "auc": round(rep["auc"], 4)}
    raw = raw_pixel_pairs(ps.images, ps.a, ps.b, ps.same, ps.folds)
    out["raw_pixels"] = {"accuracy": round(raw["accuracy"], 4), "auc": round(raw["auc"], 4)}
    log(f"verification: {out}")
    return out


def markdown(res: dict) -> str:
    """The result as a markdown table."""
    lines = [f"# Unlearnable examples ({'quick' if res['quick'] else 'full'})", "",
             f"{res['people']} LFW people, {res['train_images']} protected training images, "
             f"{res['test_images']} clean held-out images, {res['image_size']} px; surrogate "
             f"{res['surrogate']}. Target: protected/clean top-1 at most {res['target']}.", "",
             "| row | noise | model | clean top-1 | protected top-1 | ratio | holds |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['row']}{note} | {r['mode']} | {r['arch']} | {r['clean_top1']:.3f} | "
                     f"{r['protected_top1']:.3f} | {r['protected_over_clean']} | "
                     f"{'yes' if r['holds'] else 'no'} |")
    v = res.get("verification", {})
    if "clean" in v:
        lines += ["", f"Verification on {v['pairs']} pairsDevTest pairs (none of these people): "
                  f"clean-trained {v['clean']['accuracy']:.3f} (AUC {v['clean']['auc']:.3f}), "
                  f"protected-trained {v['protected']['accuracy']:.3f} "
                  f"(AUC {v['protected']['auc']:.3f}), raw pixels "
                  f"{v['raw_pixels']['accuracy']:.3f}."]
    lines += ["", "| noise | iterations | condition reached | s/image | max "
              "| mean change, re-aligned chip | SSIM | PSNR dB |",
              "|---|---|---|---|---|---|---|---|"]
    for mode, n in res["noise"].items():
        lines.append(f"| {mode} | {n['iterations']} | {n['reached']} | {n['seconds_per_image']} "
                     f"| {n['max_perturbation_levels']}/255 | "
                     f"{n['mean_abs_change_realigned_chip'] * 255:.2f}/255 | {n['ssim']} | "
                     f"{n['psnr_db']} |")
    return "\n".join(lines) + "\n"
