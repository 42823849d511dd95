"""What the mode and the policy registry share about the document each keeps its entries in."""
from __future__ import annotations

import contextlib
from typing import Callable


def shared_change(documents, name: str, reload: Callable[[], None]):
    """A context manager around one change of document `name`. With shared documents (several
    instances: the store has `locked`) the change is one transaction under the document's lock, made
    against the document as stored now (`reload` reads it again under the lock), not as this instance
    last saw it; otherwise it does nothing."""
    locked = getattr(documents, "locked", None)
    if locked is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(locked(name))
    try:
        reload()
    except BaseException:
        stack.close()
        raise
    return stack
