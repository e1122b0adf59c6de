"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class AutosquashError(Exception):
    """Bad input or an unmet precondition, stated in one line for the user."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the main thread is, so that every Ctrl-C cleanup runs for it too."""


def on_sigterm(signum, frame) -> None:
    """A SIGTERM handler: raise Terminated (the CLI installs it, and the search again after Ray starts, whose
    own handler would otherwise exit at once and dump its stacks)."""
    raise Terminated()
