"""The one error type for bad user input, and how the CLI words it.

``InputError`` (a ``ValueError``) carries where the problem is (file, manifest line, sample id) so the
command line prints one ``explainprune <cmd>: error: FILE:LINE: sample ID: what; what to do`` line.
Raised before any model work wherever the check is possible.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: ``message`` plus where it is (``file``, 1-based ``line``, ``sample`` id)
    and ``hint`` (what to do)."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 sample: str | None = None, hint: str | None = None):
        self.message, self.file, self.line, self.sample, self.hint = message, file, line, sample, hint
        super().__init__(self._text())

    def _text(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        if self.sample is not None:
            where += f"sample {self.sample}: "
        return where + self.message + (f"; {self.hint}" if self.hint else "")


class NotApplicable(ValueError):
    """A method that does not apply to this input (``evs`` on a prompt with no video). Asked alone it is an
    error; ``explainprune eval`` records such a (sample, method) as "n/a" and goes on."""
