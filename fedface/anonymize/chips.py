"""Anonymize an institution's aligned training chips before federated training.

With run config ``anonymize=METHOD`` every institution runs this on its own prepared data
(``client_XXX.npz``: train, validation and held-out chips) once, and keeps the result beside
it (``client_XXX.anon-<key>.npz``, the key hashing the data file and the settings): the
original chips are never changed and no later round reads them.

The chips are aligned (dlib's chip geometry, padding 0.25), so the face's place is known
and no detector runs: the face box is the chip's central square of side
``size / (1 + 2 * padding)``, grown by ``mask_scale`` like a detected face. K-Same pools all
of the institution's chips (each output is the mean of at least ``k`` of them); the cloak
perturbs each chip against the surrogate model named by ``surrogate=PATH``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedface.anonymize.boxes import Box
from fedface.anonymize.registry import build_method, resolve_options
from fedface.io import hash_file

__all__ = ["CHIPS_VERSION", "anonymize_chips", "anonymized_client_data", "chip_face_box"]

#: Part of the cache key: bump when the same settings give other chips.
CHIPS_VERSION = "fedface-anon-chips-1"


def chip_face_box(size: int, padding: float = 0.25, mask_scale: float = 1.3) -> Box:
    """The face's box in an aligned ``size x size`` chip, grown by ``mask_scale``."""
    side = size / (1 + 2 * padding)
    c = size / 2
    return Box(c - side / 2, c - side / 2, c + side / 2, c + side / 2).expand(mask_scale)


def anonymize_chips(chips: np.ndarray, method: str, preset: str = "medium",
                    options: str | dict | None = None, padding: float = 0.25,
                    mask_scale: float = 1.3) -> np.ndarray:
    """``chips`` (``N x S x S x 3`` uint8, aligned) anonymized with ``method``."""
    chips = np.asarray(chips)
    if len(chips) == 0:
        return chips.copy()
    values = resolve_options(method, preset, options)
    if method == "ksame":
        from fedface.anonymize.ksame import ksame_chips
        return ksame_chips(chips, int(values["k"]), padding=padding)[0]
    if method == "cloak":
        from fedface.anonymize.cloak import CloakConfig, cloak_chips
        from fedface.models.io import load_backbone
        backbone, _ = load_backbone(str(values["surrogate"]))
        return cloak_chips(backbone, chips, CloakConfig(budget=float(values["budget"])))
    m = build_method(method, preset, options)
    box = chip_face_box(chips.shape[1], padding, mask_scale)
    return np.stack([m.apply(c, [box]) for c in chips])


def _key(path: Path, cfg) -> str:
    h = hash_file(path)
    h.update(json.dumps([CHIPS_VERSION, cfg.anonymize, cfg.anonymize_preset,
                         sorted(resolve_options(cfg.anonymize, cfg.anonymize_preset,
                                                cfg.anonymize_options).items())],
                        default=str).encode())
    return h.hexdigest()[:16]


def anonymized_client_data(path: str | Path, cfg):
    """The institution's data at ``path`` with every chip anonymized as ``cfg`` says
    (``cfg.anonymize == "none"``: the data as it is). Cached beside ``path``."""
    from fedface.data.prepare import ClientData

    path = Path(path)
    if cfg.anonymize == "none":
        return ClientData.load(path)
    cached = path.with_name(f"{path.stem}.anon-{_key(path, cfg)}.npz")
    if cached.exists():
        return ClientData.load(cached)
    data = ClientData.load(path)
    parts = [data.x_train, data.x_val] + ([data.x_holdout] if data.x_holdout is not None else [])
    sizes = [len(p) for p in parts]
    out = anonymize_chips(np.concatenate(parts), cfg.anonymize, cfg.anonymize_preset,
                          cfg.anonymize_options)
    split = np.split(out, np.cumsum(sizes)[:-1])
    anon = ClientData(split[0], data.y_train, split[1], data.y_val,
                      split[2] if data.x_holdout is not None else None, data.y_holdout)
    anon.save(cached)
    return anon
