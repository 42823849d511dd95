"""Who a caller is, as every layer sees it: the sender name and the rights its credential grants."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Identity:
    sender: str
    allowed_modes: frozenset[str] | None = None    # None = every mode
    can_start_sessions: bool = True
    max_open_sessions: int | None = None
    can_manage_mode_registry: bool = False
    is_observer: bool = False
