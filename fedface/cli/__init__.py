"""The ``fedface`` command line: a thin layer over the library.

Commands: ``demo`` (the main job on the generated default set), ``train`` (federated or
centralized), ``prepare`` (align, split and check data), ``eval`` (verification of a saved
model on a pair file), ``keys`` (the encryption key ceremony), ``bench`` (measurements
that print JSON), ``models`` (what the registries hold). :mod:`fedface.cli.app` composes
them, one module per command group; ``main`` is the ``fedface`` script.
"""

from fedface.cli.app import app, main

__all__ = ["app", "main"]
