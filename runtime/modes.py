"""The mode registry: compiled modes by name, and the listings the discovery RPCs return."""
from __future__ import annotations

import threading

from .codegen import CompiledMode, load_modes


class ModeRegistry:
    def __init__(self, modes: list[CompiledMode]):
        self._lock = threading.Lock()
        self._modes: dict[str, CompiledMode] = {}
        for mode in modes:
            # A later directory may override an earlier spec of the same mode name.
            self._modes[mode.name] = mode
        self._refresh()

    @classmethod
    def from_spec_dirs(cls, extra_dirs: list[str] | None = None) -> "ModeRegistry":
        return cls(load_modes(extra_dirs))

    def _refresh(self) -> None:
        modes = list(self._modes.values())
        self.names = sorted(self._modes)
        self.standard = [m.descriptor for m in sorted(
            (m for m in modes if m.standards_track), key=lambda m: (m.list_position, m.name))]
        self.extensions = [m.descriptor for m in sorted(
            (m for m in modes if not m.standards_track), key=lambda m: m.name)]

    def get(self, name: str) -> CompiledMode | None:
        return self._modes.get(name)
