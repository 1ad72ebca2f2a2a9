"""Attacks that audit the privacy of trained models.

Membership inference by loss threshold (Yeom et al. 2018, shadow-model free): the
attacker holds a client's model (backbone and head), computes each image's loss and
guesses "member" below a threshold. The attack's AUC over all thresholds is reported:
0.5 means the model does not tell its training images from the others.

Losses (the keys of :func:`sample_losses` and of ``by_loss``):

- ``true_label``: Yeom et al.'s attack, the cross-entropy at the image's own class,
  ``-log p(y | x)`` (the head's logits at inference, without a training margin). It
  exists only where every image, member or not, has a class in the head: members and
  *record-level* non-members (held-out images of the same people).
- ``ce``: cross-entropy at the most likely class, ``-log max_c p(c | x)``, label free;
- ``cosine``: ``1 - max_c cos(f(x), w_c)``, the distance to the nearest class weight,
  label free (insensitive to the embedding's norm, which makes unfamiliar faces look
  confident under ``ce``).

Headline (``auc``, named in ``attack``): with labels, the ``true_label`` attack, fixed in
advance whatever the other losses give; without labels (*person-level* non-members,
other people, have no class in the head, so an attacker has no true-label loss for
them) the stronger of the label-free attacks, picked after the fact: an auditor reports
the best attack, which reads slightly high at AUC 0.5. ``by_loss`` holds every attack
that applies, ``strongest`` names the one with the highest AUC.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.eval import roc_auc
from fedface.eval.embed import to_tensor

TRUE_LABEL = "true_label"
LABEL_FREE = ("ce", "cosine")


@torch.no_grad()
def sample_losses(backbone: nn.Module, head: nn.Module, images: np.ndarray,
                  labels: np.ndarray | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every chip's losses (uint8, N x H x W x 3): ``ce`` and ``cosine`` at the most
    likely class and, when ``labels`` (classes of ``head``) are given, ``true_label``."""
    if labels is not None:
        labels = _check_labels(labels, len(images), head, "labels")
    backbone.eval()
    head.eval()
    out: dict[str, list] = {k: [] for k in ((TRUE_LABEL,) if labels is not None else ()) + LABEL_FREE}
    weight = F.normalize(head.weight, dim=1)
    for start in range(0, len(images), batch_size):
        emb = backbone(to_tensor(images[start : start + batch_size]))
        logp = F.log_softmax(head(emb), dim=1)
        if labels is not None:
            y = torch.as_tensor(labels[start : start + batch_size]).long()
            out[TRUE_LABEL].append((-logp.gather(1, y[:, None])[:, 0]).numpy())
        out["ce"].append((-logp.max(dim=1).values).numpy())
        out["cosine"].append((1 - (F.normalize(emb, dim=1) @ weight.T).max(dim=1).values).numpy())
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in out.items()}


def _check_labels(labels, n: int, head: nn.Module, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    classes = int(head.weight.shape[0])
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected {n} labels, one per image, got shape {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"{name}: classes must lie in [0, {classes}) (the head's classes); got "
                         f"[{labels.min()}, {labels.max()}]. Images of people without a class "
                         "have no true-label loss: leave their labels out")
    return labels


def membership_inference_auc(backbone: nn.Module, head: nn.Module, members: np.ndarray,
                             non_members: np.ndarray, member_labels: np.ndarray | None = None,
                             non_member_labels: np.ndarray | None = None) -> dict:
    """AUC of the loss-threshold attack (members have the lower loss).

    Give both ``member_labels`` and ``non_member_labels`` (the images' classes in
    ``head``) for the true-label attack (record level: non-members are other images of
    the same people); give neither when the non-members have no class (person level).

    Returns ``{"auc", "attack", "advantage", "strongest", "members", "non_members",
    "by_loss"}``: ``auc`` of the headline attack named in ``attack`` (``true_label``
    with labels, else the stronger label-free loss), ``advantage`` ``2 * (auc - 0.5)``,
    ``strongest`` the attack with the highest AUC, and per attack (``by_loss``) its AUC
    and the mean member and non-member losses.
    """
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("Membership inference needs at least one member and one non-member")
    if (member_labels is None) != (non_member_labels is None):
        raise ValueError("Give the labels of both members and non-members (true-label attack) "
                         "or of neither (label-free attacks)")
    lm = sample_losses(backbone, head, members, member_labels)
    ln = sample_losses(backbone, head, non_members, non_member_labels)
    is_member = np.concatenate([np.ones(len(members), bool), np.zeros(len(non_members), bool)])
    by_loss = {}
    for kind in lm:
        auc = float(roc_auc(np.concatenate([-lm[kind], -ln[kind]]), is_member))
        by_loss[kind] = {"auc": auc, "member_loss": float(lm[kind].mean()),
                         "non_member_loss": float(ln[kind].mean())}
    strongest = max(by_loss, key=lambda k: by_loss[k]["auc"])
    attack = TRUE_LABEL if TRUE_LABEL in by_loss else max(LABEL_FREE, key=lambda k: by_loss[k]["auc"])
    auc = by_loss[attack]["auc"]
    return {"auc": auc, "attack": attack, "advantage": 2 * (auc - 0.5), "strongest": strongest,
            "members": int(len(members)), "non_members": int(len(non_members)),
            "by_loss": by_loss}
