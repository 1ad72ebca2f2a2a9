"""Errors the user can fix: the command line prints them as ``error: <message>``, exit code 2.

:class:`UserError` is the one base class the CLI maps to that exit path. The library's
older refusals (``RunConfig``'s ``ValueError``, ``KeyBundleError``, ``PrivacyConfigError``,
a missing data folder's ``FileNotFoundError`` ...) predate it; each command names the
ones it treats as the user's with :func:`user_errors`, which re-raises them as
:class:`UserError` with the same message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem in the user's input or files, with a message that says what to do."""


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Re-raise ``kinds`` raised in the block as :class:`UserError` (same message)."""
    try:
        yield
    except UserError:
        raise
    except kinds as err:
        raise UserError(str(err)) from err
