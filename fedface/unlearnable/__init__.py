"""Unlearnable examples: error-minimizing noise that keeps face images from being learned.

:mod:`.noise` makes the noise (min-min, sample- or class-wise), :mod:`.files` protects an
identity folder (full images, manifest, resume), :mod:`.share` protects the copy of a
client's data that leaves the federation, :mod:`.evaluate` and :mod:`.bench` measure whether
a recognizer still learns the people, and what breaks the protection.
"""

from fedface.unlearnable.files import protect_tree
from fedface.unlearnable.noise import MinMin, NoiseConfig, StopReport, parse_eps

__all__ = ["MinMin", "NoiseConfig", "StopReport", "parse_eps", "protect_tree"]
