"""Evaluation: preprocessing, embeddings, verification and identification metrics."""

from fedface.eval.embed import embed, pair_scores, raw_pixel_embed, to_tensor
from fedface.eval.identification import gallery_probe_split, rank1
from fedface.eval.verification import (
    eer,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_report,
)

__all__ = [
    "eer",
    "embed",
    "gallery_probe_split",
    "kfold_accuracy",
    "pair_scores",
    "rank1",
    "raw_pixel_embed",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "to_tensor",
    "verification_report",
]
