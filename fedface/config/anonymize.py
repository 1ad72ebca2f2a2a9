"""Client-side anonymization of a run's training data: the settings it refuses.

``anonymize=METHOD`` makes every institution anonymize its own images once, before any
training (cached beside its data), with the method's ``anonymize-preset`` and any
``anonymize-options`` (``key=value,...``, e.g. ``k=10`` or ``surrogate=/path/model.pt``).
The method names and presets are those of ``fedface anonymize``
(:mod:`fedface.anonymize.registry`).
"""

from __future__ import annotations

#: Methods a client may apply to its training data (scramble's output is noise until
#: restored: a model learns nothing from it).
TRAINING_METHODS = ("none", "blur", "mosaic", "mask", "dppix", "ksame", "cloak")


def anonymize_problems(cfg) -> list[str]:
    """What ``anonymize``, ``anonymize_preset`` and ``anonymize_options`` cannot do."""
    if cfg.anonymize == "none":
        return []
    if cfg.anonymize not in TRAINING_METHODS:
        why = (": its output is noise until restored with the key, a model learns nothing "
               "from it" if cfg.anonymize == "scramble" else "")
        return [f"anonymize={cfg.anonymize!r}{why}; use one of {', '.join(TRAINING_METHODS)}"]
    from fedface.anonymize.registry import resolve_options
    try:
        values = resolve_options(cfg.anonymize, cfg.anonymize_preset, cfg.anonymize_options)
    except ValueError as err:
        return [f"anonymize: {err}"]
    if cfg.anonymize == "cloak" and not values.get("surrogate"):
        return ["anonymize=cloak needs the surrogate model it cloaks against: "
                "anonymize-options=\"surrogate=/path/to/model.pt\""]
    return []
