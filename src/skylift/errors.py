"""The root of every Skylift exception family.

Each source of failure has its own family (untrusted content, transport,
installation, bootloader, user input). All of them derive from
:class:`SkyliftError`, whose :meth:`~SkyliftError.diagnostics` gives one line
that says what failed and, where there is one, what to do about it. The CLI
catches :class:`SkyliftError` in one place and prints that line.

Messages never contain key material, passphrases or payload bytes.
"""

from __future__ import annotations

__all__ = ["SkyliftError", "UserInputError"]


class SkyliftError(Exception):
    """Base of all errors Skylift raises on purpose.

    ``hint`` says what the person in front of it can do next.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        """The message without the hint."""
        return str(self.args[0]) if self.args else type(self).__name__

    def diagnostics(self) -> str:
        """One line for people: what went wrong, then what to do."""
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UserInputError(SkyliftError):
    """An argument, option or file named by the user is not usable."""
