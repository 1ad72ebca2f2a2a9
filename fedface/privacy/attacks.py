"""Attacks that audit the privacy of trained models.

Membership inference by loss threshold (Yeom et al. 2018, shadow-model free): the
attacker holds a client's model (backbone and head), computes each image's loss and
guesses "member" below a threshold. A face model's non-members are people the head has
no class for, so the loss is taken at the most likely class, for members and
non-members alike, in two forms:

- ``ce``: cross-entropy at the most likely class, ``-log max_c p(c | x)``;
- ``cosine``: ``1 - max_c cos(f(x), w_c)``, the distance to the nearest class weight
  (insensitive to the embedding's norm, which makes unfamiliar faces look confident
  under ``ce``).

The attack's AUC over all thresholds is reported for both, and ``auc`` is the stronger
of the two (an auditor reports the best attack): 0.5 means the model does not tell its
training images from others.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.eval import roc_auc
from fedface.eval.embed import to_tensor


@torch.no_grad()
def sample_losses(backbone: nn.Module, head: nn.Module, images: np.ndarray,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """Both losses at the most likely class (``ce``, ``cosine``) for every chip
    (uint8, N x H x W x 3)."""
    backbone.eval()
    head.eval()
    ce, cos = [], []
    weight = F.normalize(head.weight, dim=1)
    for start in range(0, len(images), batch_size):
        emb = backbone(to_tensor(images[start : start + batch_size]))
        logp = F.log_softmax(head(emb), dim=1)
        ce.append((-logp.max(dim=1).values).numpy())
        cos.append((1 - (F.normalize(emb, dim=1) @ weight.T).max(dim=1).values).numpy())
    empty = np.zeros(0, np.float32)
    return {"ce": np.concatenate(ce) if ce else empty,
            "cosine": np.concatenate(cos) if cos else empty}


def membership_inference_auc(backbone: nn.Module, head: nn.Module, members: np.ndarray,
                             non_members: np.ndarray) -> dict:
    """AUC of the loss-threshold attack (members have the lower loss).

    Returns ``{"auc", "attack", "advantage", "members", "non_members", "by_loss"}``:
    ``auc`` of the stronger loss (named in ``attack``), ``advantage`` ``2 * (auc - 0.5)``,
    and per loss its AUC and the mean member and non-member losses.
    """
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("Membership inference needs at least one member and one non-member")
    lm = sample_losses(backbone, head, members)
    ln = sample_losses(backbone, head, non_members)
    is_member = np.concatenate([np.ones(len(members), bool), np.zeros(len(non_members), bool)])
    by_loss = {}
    for kind in lm:
        auc = float(roc_auc(np.concatenate([-lm[kind], -ln[kind]]), is_member))
        by_loss[kind] = {"auc": auc, "member_loss": float(lm[kind].mean()),
                         "non_member_loss": float(ln[kind].mean())}
    attack = max(by_loss, key=lambda k: by_loss[k]["auc"])
    auc = by_loss[attack]["auc"]
    return {"auc": auc, "attack": attack, "advantage": 2 * (auc - 0.5),
            "members": int(len(members)), "non_members": int(len(non_members)),
            "by_loss": by_loss}
