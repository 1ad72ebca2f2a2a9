"""Membership-inference audit of a finished run, institution by institution.

A run folder ``OUT`` holds the global backbone (``OUT/model.pt``) and, in simulation,
every institution's private head in its state folder ``OUT/clients`` as
``client_XXX_head_r<round>.pt`` (the last two rounds it trained in are kept). This
module is where that naming is defined (:func:`client_state_dir`, :func:`head_prefix`,
:func:`head_file`, :func:`saved_heads`), for the client that writes the heads and the
audit that reads them.

:func:`audit_run` attacks each institution's final model (global backbone + its newest
head) with :func:`fedface.privacy.attacks.membership_inference_auc`, two ways:

- ``records`` (what image-level DP-SGD bounds): members are training images,
  non-members held-out images of the *same* people (``holdout-images``), never trained
  on. Only people who gave a held-out image take part, with as many training images
  as held-out ones each (:func:`records_split`), so both sides hold the same people in
  the same proportions and the attack can only tell images apart, not people. The
  headline is the true-label loss (Yeom et al. 2018).
- ``people`` (what ``dp-unit=person`` bounds; image-level DP only by group privacy):
  members are training images of the institution's people, non-members images of
  *other* people (its validation identities, which no institution trains on). Each
  person gives at most ``per_person_images`` images to either side
  (:func:`people_split`), so that people with many photos do not dominate. The attacker
  holds images the model was trained on, so this also counts what the records audit
  sees. Other people have no class in the head: the headline is the stronger label-free
  loss.

Each side is capped at ``max_images`` images (whole people).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedface.config import RunConfig
from fedface.data.prepare import ClientData, prepare
from fedface.models import build_head
from fedface.models.io import load_backbone
from fedface.privacy.attacks import membership_inference_auc

#: Bump when the audit's attack or pools change: results of another version do not compare.
AUDIT_VERSION = 2

Seed = int | Sequence[int] | np.random.SeedSequence


def _seeds(seed: Seed) -> list[np.random.SeedSequence]:
    """Two independent seeds from one."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return ss.spawn(2)


# ------------------------------------------------------------ where clients keep their heads
def client_state_dir(out: str | Path) -> Path:
    """The run's folder of the institutions' private state (simulation): ``OUT/clients``."""
    return Path(out) / "clients"


def head_prefix(client: int | None = None) -> str:
    """File prefix of an institution's heads: ``client_XXX_head`` for institution
    ``client`` in a run's shared state folder (simulation), ``head`` in a node's own
    state folder (deployment, ``client=None``)."""
    return "head" if client is None else f"client_{int(client):03d}_head"


def head_file(folder: str | Path, prefix: str, server_round: int) -> Path:
    """The file of the head saved after ``server_round``: ``<prefix>_r<round:05d>.pt``."""
    return Path(folder) / f"{prefix}_r{int(server_round):05d}.pt"


def saved_heads(folder: str | Path, prefix: str) -> dict[int, Path]:
    """{round: file} of the heads saved under ``prefix`` in ``folder`` (see :func:`head_file`)."""
    out = {}
    for f in Path(folder).glob(f"{prefix}_r*.pt"):
        try:
            out[int(f.stem.rsplit("_r", 1)[1])] = f
        except ValueError:
            continue
    return out


# ----------------------------------------------------------------------------- the pools
def records_split(y_train: np.ndarray, y_holdout: np.ndarray, max_images: int = 300,
                  seed: Seed = 0) -> tuple[np.ndarray, np.ndarray]:
    """Members (indices into ``y_train``) and non-members (into ``y_holdout``) of the
    record-level audit, matched person by person.

    Only people with a held-out image take part; each gives ``n = min(training images,
    held-out images)`` of each kind, drawn at random. People are taken in random order
    while the non-members stay within ``max_images``.
    """
    y_train, y_holdout = np.asarray(y_train), np.asarray(y_holdout)
    rng = np.random.default_rng(seed)
    members: list[int] = []
    others: list[int] = []
    for person in rng.permutation(np.unique(y_holdout)):
        own = np.flatnonzero(y_train == person)
        held = np.flatnonzero(y_holdout == person)
        n = min(len(own), len(held))
        if n == 0 or len(others) + n > max_images:
            continue
        members.extend(rng.choice(own, n, replace=False).tolist())
        others.extend(rng.choice(held, n, replace=False).tolist())
    return np.sort(np.array(members, int)), np.sort(np.array(others, int))


def per_person_sample(labels: np.ndarray, per_person: int = 2, max_images: int = 300,
                      seed: Seed = 0) -> np.ndarray:
    """Indices of up to ``per_person`` random images of each person, people in random
    order while the total stays within ``max_images``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for person in rng.permutation(np.unique(labels)):
        own = np.flatnonzero(labels == person)
        n = min(per_person, len(own))
        if len(picked) + n > max_images:
            continue
        picked.extend(rng.choice(own, n, replace=False).tolist())
    return np.sort(np.array(picked, int))


def people_split(y_train: np.ndarray, y_other: np.ndarray, per_person_images: int = 2,
                 max_images: int = 300, seed: Seed = 0) -> tuple[np.ndarray, np.ndarray]:
    """Members (into ``y_train``: the institution's people) and non-members (into
    ``y_other``: other people) of the person-level audit, at most ``per_person_images``
    images per person on either side and ``max_images`` per side."""
    a, b = _seeds(seed)
    return (per_person_sample(y_train, per_person_images, max_images, a),
            per_person_sample(y_other, per_person_images, max_images, b))


# ----------------------------------------------------------------------------- the audit
def _summary(res: dict) -> dict:
    return {k: res[k] for k in ("auc", "attack", "strongest", "members", "non_members", "by_loss")}


def audit_client(backbone: nn.Module, head: nn.Module, data: ClientData, max_images: int = 300,
                 per_person_images: int = 2, seed: Seed = 0) -> dict:
    """Both audits of one institution's model: ``{"records": ..., "people": ...}``, each
    present when its non-members exist (``records`` needs held-out images, ``people``
    validation identities), each the summary of
    :func:`~fedface.privacy.attacks.membership_inference_auc` (``auc``, ``attack``,
    ``strongest``, ``members``, ``non_members``, ``by_loss``)."""
    s_rec, s_ppl = _seeds(seed)
    out = {}
    if data.y_holdout is not None and len(data.y_holdout):
        m, n = records_split(data.y_train, data.y_holdout, max_images, s_rec)
        if len(m):
            out["records"] = _summary(membership_inference_auc(
                backbone, head, data.x_train[m], data.x_holdout[n],
                data.y_train[m], data.y_holdout[n]))
    if len(data.y_val) and len(data.y_train):
        m, n = people_split(data.y_train, data.y_val, per_person_images, max_images, s_ppl)
        if len(m) and len(n):
            out["people"] = _summary(membership_inference_auc(backbone, head, data.x_train[m],
                                                              data.x_val[n]))
    return out


def audit_run(cfg: RunConfig, max_images: int = 300, per_person_images: int = 2) -> list[dict]:
    """Membership inference on every institution's final model of the run in ``cfg.out``.

    Reads ``OUT/model.pt`` and each institution's newest head in ``OUT/clients``, and
    the run's prepared data (``prepare(cfg)``: the cached partition, re-made if gone).
    Returns one row per institution that has a head: ``{"client", "head_round",
    "records", "people"}`` (see :func:`audit_client`; an audit without non-members is
    left out), seeded by ``(cfg.seed, client)``.
    """
    out = Path(cfg.out)
    backbone, meta = load_backbone(out / "model.pt")
    data = prepare(cfg)
    rows = []
    for i in range(len(data.client_files)):
        heads = saved_heads(client_state_dir(out), head_prefix(i))
        if not heads:
            continue
        last = max(heads)
        cd = data.load_client(i)
        head = build_head(cfg.head, int(meta["embedding_size"]), cd.num_classes)
        try:
            head.load_state_dict(torch.load(heads[last], map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - truncated file, foreign file, other shape
            raise ValueError(f"Head {heads[last]} does not fit institution {i} of this run "
                             f"({cfg.head}, {cd.num_classes} classes): {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200]}") from None
        audits = audit_client(backbone, head, cd, max_images, per_person_images, (cfg.seed, i))
        rows.append({"client": i, "head_round": last, **audits})
    return rows
