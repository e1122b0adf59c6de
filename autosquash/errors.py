"""The one error type the CLI turns into a one-line message and a non-zero exit, and the one warning type it
prints in one line."""

import threading


class AutosquashError(Exception):
    """Bad input or an unmet precondition, stated in one line for the user."""


class DeprecatedInput(UserWarning):
    """An input spelled the old way (a renamed field, flag or command): it still works, announced in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the main thread is, so that every Ctrl-C cleanup runs for it too."""


# Set by on_sigterm: Ray's waits (ray.get, ray.wait) turn any KeyboardInterrupt raised inside them into a
# plain one, so the exception's type alone cannot tell a SIGTERM from a Ctrl-C.
_sigterm = threading.Event()


def on_sigterm(signum, frame) -> None:
    """A SIGTERM handler: raise Terminated (the CLI installs it, and the search again after Ray starts, whose
    own handler would otherwise exit at once and dump its stacks)."""
    _sigterm.set()
    raise Terminated()


def was_terminated(e: BaseException) -> bool:
    """Whether interruption `e` came from a SIGTERM, even where a library re-raised it as a KeyboardInterrupt."""
    return isinstance(e, Terminated) or _sigterm.is_set()


def forget_sigterm() -> None:
    """Clear the record of a SIGTERM (the CLI does when a command ends, for a caller that runs another)."""
    _sigterm.clear()
