"""Precise spec errors: which file, which key path, which line, what is wrong."""
from __future__ import annotations


class SpecError(Exception):
    def __init__(self, file: str, path: str, message: str, line: int | None = None):
        self.file = file
        self.path = path
        self.message = message
        self.line = line
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {path or '<root>'}: {message}")
