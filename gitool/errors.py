"""Errors that reach the user as one clear line.

Every module raises these instead of printing; the CLI turns them into a message on
stderr and an exit code: 2 for a usage error (an impossible option, an unknown name),
1 for a failure (a missing, corrupt or wrong-kind file, a method that cannot solve).
The pure math of ``gitool.attacks`` raises its own types; :func:`attack_errors` turns
them into these where an adapter calls it.
"""

from __future__ import annotations

import contextlib


class GitoolError(Exception):
    """A failure the user can act on. Exit code 1."""

    exit_code = 1


class UsageError(GitoolError):
    """The command line asks for something impossible or unknown. Exit code 2."""

    exit_code = 2


@contextlib.contextmanager
def attack_errors():
    """Let the math's own errors (``gitool.attacks.errors``) reach the user as gitool's:
    an :class:`~gitool.attacks.errors.InputError` as a usage error, any other
    :class:`~gitool.attacks.errors.AttackError` as a failure, message unchanged."""
    from gitool.attacks.errors import AttackError, InputError

    try:
        yield
    except InputError as exc:
        raise UsageError(str(exc)) from None
    except AttackError as exc:
        raise GitoolError(str(exc)) from None
