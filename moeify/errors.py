"""The project's error type for user mistakes: the CLI prints its message and exits 2."""


class MoeifyError(Exception):
    """A user mistake (bad input, impossible configuration). The message names the fix."""


class NoMatchError(MoeifyError):
    """No dense FFN matched, or the selection picked none of the matched sites."""
