"""The project's error type for user mistakes: the CLI prints its message and exits 2.

A message names the fix in the caller's own terms. Where the fix is an option, the message
holds `opt(name, value)` markers: Python callers read `num_experts=8`, and the CLI renders the
same error as `--experts 8` (see `MoeifyError.render`).
"""
from __future__ import annotations

import re
from typing import Any, Callable

_MARK = "\x1f"  # ASCII unit separator: never part of a real message
_OPTION = re.compile(f"{_MARK}([A-Za-z_][A-Za-z0-9_]*)(?:=(.*?))?{_MARK}")
_NO_VALUE = object()


def opt(name: str, value: Any = _NO_VALUE) -> str:
    """A reference to option `name` (a MoEConfig field or keyword argument), optionally with a value."""
    return f"{_MARK}{name}{_MARK}" if value is _NO_VALUE else f"{_MARK}{name}={value!r}{_MARK}"


def as_python(name: str, value: str | None) -> str:
    return name if value is None else f"{name}={value}"


class MoeifyError(Exception):
    """A user mistake (bad input, impossible configuration). The message names the fix."""

    def render(self, option: Callable[[str, str | None], str] = as_python) -> str:
        """The message with each option reference written by `option(name, repr_of_value or None)`."""
        text = str(self.args[0]) if self.args else ""
        return _OPTION.sub(lambda m: option(m.group(1), m.group(2)), text)

    def __str__(self) -> str:
        return self.render()


class NoMatchError(MoeifyError):
    """No dense FFN matched, or the selection picked none of the matched sites."""
