"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class AutosquashError(Exception):
    """Bad input or an unmet precondition, stated in one line for the user."""
