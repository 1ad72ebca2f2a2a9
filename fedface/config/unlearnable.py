"""Unlearnable copies of a client's data: the setting it refuses.

``share-unlearnable=sample`` (or ``class``) makes every institution write, once, a copy of
its training images protected with error-minimizing noise, to hand over outside the
federation (:mod:`fedface.unlearnable.share`); what it trains on is unchanged.
"""

from __future__ import annotations

#: ``off``, or a noise mode of :mod:`fedface.unlearnable.noise` (kept equal by a test).
SHARE_CHOICES = ("off", "sample", "class")


def share_problems(cfg) -> list[str]:
    """What ``share_unlearnable`` cannot do."""
    if cfg.share_unlearnable not in SHARE_CHOICES:
        return [f"share_unlearnable={cfg.share_unlearnable!r}: use one of "
                f"{', '.join(SHARE_CHOICES)}"]
    return []
