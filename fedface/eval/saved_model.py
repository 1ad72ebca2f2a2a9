"""A saved model (``model.pt``) on a pair file: what ``fedface eval`` does.

The one module of :mod:`fedface.eval` that reads files and models (data preparation,
the model registry, the training module's verification protocol); the package's own
``__init__`` does not import it, so the metrics stay a leaf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedface.config import RunConfig
from fedface.data.datasets import find_images_root
from fedface.data.pairs import read_pairs
from fedface.data.prepare import build_pairset, is_prealigned, make_aligner
from fedface.data.report import DataReport
from fedface.eval import embed, gallery_probe_split, rank1
from fedface.models.io import load_backbone
from fedface.progress import ProgressFn
from fedface.training import raw_pixel_pairs, verify_pairs


def evaluate_model_on_pairs(model_path: str | Path, images_root: str | Path,
                            pairs_file: str | Path, flip: bool = False,
                            cache_dir: str | None = None,
                            progress: ProgressFn | None = None) -> dict:
    """Verification report (learned and raw-pixel) and rank-1 identification.

    Rank-1 uses the images named by the pairs: one image per identity with two or more
    goes to the gallery, the others are probes.
    """
    backbone, meta = load_backbone(model_path)
    images_root = Path(images_root)
    pairs_file = Path(pairs_file)
    if not pairs_file.exists():
        raise FileNotFoundError(f"Pair file {pairs_file} does not exist")
    if not images_root.exists():
        raise FileNotFoundError(f"Images folder {images_root} does not exist")
    cfg = RunConfig(image_size=meta["image_size"], cache_dir=cache_dir or "")
    report = DataReport()
    root = images_root if is_prealigned(images_root) else find_images_root(images_root)
    pairs = read_pairs(pairs_file, root, report=report)
    if not pairs:
        raise ValueError(f"{pairs_file} gave no usable pairs: {report.summary_lines()}")
    ps = build_pairset(pairs_file, pairs, make_aligner(cfg, images_root), report, progress)
    rep = verify_pairs(backbone, ps.images, ps.a, ps.b, ps.same, ps.folds, flip=flip)
    rep["raw_pixels"] = raw_pixel_pairs(ps.images, ps.a, ps.b, ps.same, ps.folds)
    # Identification among the pair images (labels from their identity folders).
    uniq = sorted({p.a for p in pairs} | {p.b for p in pairs})
    names = sorted({p.parent.name for p in uniq})
    labels = np.array([names.index(p.parent.name) for p in uniq])
    gallery, probes = gallery_probe_split(labels, seed=0)
    out = {"model": {k: v for k, v in meta.items() if k != "extra"}, "pairs_file": str(pairs_file),
           "verification": rep, "report": report.to_dict()}
    if len(probes):
        emb = embed(backbone, ps.images, flip=flip)
        out["rank1"] = rank1(emb[gallery], labels[gallery], emb[probes], labels[probes])
        out["rank1_probes"] = len(probes)
    return out
