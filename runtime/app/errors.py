"""Errors shared by the application's modules (below all of them, so none has to import upward)."""
from __future__ import annotations


class StartupError(Exception):
    """The daemon cannot start; `run` logs the message and exits 1. Raised by the daemon and by the
    additional services it starts (the console)."""
