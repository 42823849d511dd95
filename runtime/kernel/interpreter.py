"""The per-message interpreter: runs a compiled mode (`codegen.model.CompiledMode`, data built once per
mode by the spec compiler) against one session.

Two steps around the engine's commit point:

* `evaluate` judges a message and computes the session's next state without changing the session:
  roles, decoding, guards, readiness, policy, then the effects on a lazily made copy of the mode
  state (`StateCopy` / `ListCopy`), the next phase and the resolution. It returns a `Next`.
* `apply` swaps that next state in once the record is durable; it runs no hook and cannot fail.

`may_send` (the authorisation step alone) and `check_start` (the spec's SessionStart checks) are the
other two places where a mode's hooks run. Replay, what-if replay and the console's phase trail go
through the same functions, so live judging and every re-judging agree.
"""
from __future__ import annotations

from ..codegen.hooks import hook_text
from ..codegen.model import CompiledMode
from ..specs.hooks.context import HookContext, Reject

__all__ = ["Next", "ListCopy", "StateCopy", "apply", "check_start", "copy_state", "evaluate", "may_send"]


class Next:
    """A judged message: the transition it takes and the session's state, phase and resolution after it."""

    __slots__ = ("transition", "ctx", "state", "phase", "resolution")

    def __init__(self, transition, ctx, state, phase, resolution):
        self.transition = transition
        self.ctx = ctx
        self.state = state
        self.phase = phase
        self.resolution = resolution


def may_send(mode: CompiledMode, session, sender: str, message_type: str) -> bool:
    """The authorisation step of `evaluate` alone (no payload is looked at)."""
    allowed = mode.senders.get(message_type, mode.unlisted_senders)
    return any(role(session, sender) for role in allowed)


def check_start(mode: CompiledMode, session) -> None:
    """The spec's `session_start.requires` checks against a new session; Reject when one fails."""
    for check in mode.start_checks:
        if not check(session):
            raise Reject("InvalidPayload", detail=f"SessionStart refused by {mode.name}: {hook_text(check)}")


def evaluate(mode: CompiledMode, session, sender: str, message_type: str, raw: bytes, timestamp_ms: int) -> Next:
    """Judge a message and compute the session's next state, without changing the session.

    Everything the mode decides runs here, before the commit point. Raises Reject when the message
    is refused; a hook that raises anything else is a refusal too (InvalidModeState), so a broken hook
    can never leave a durable message the session cannot apply (replay takes the same path).
    """
    try:
        return _judge(mode, session, sender, message_type, raw, timestamp_ms)
    except Reject:
        raise
    except Exception as exc:   # a hook failed: refused before anything is durable
        raise Reject("InvalidModeState", detail=f"a hook of {mode.name} failed on {message_type}: "
                                                f"{type(exc).__name__}: {str(exc)[:200]}") from None


def apply(session, nxt: Next) -> bytes | None:
    """Swap the judged next state in (after the record is durable). Returns the resolution bytes when
    the message commits the session. Runs no hook: it cannot fail."""
    session.state = nxt.state
    session.phase = nxt.phase
    return nxt.resolution


def _judge(mode: CompiledMode, session, sender, message_type, raw, timestamp_ms) -> Next:
    allowed = mode.senders.get(message_type, mode.unlisted_senders)
    if not any(role(session, sender) for role in allowed):
        raise Reject("Forbidden", detail=f"{sender!r} may not send {message_type}")
    by_phase = mode.transitions.get(message_type)
    if by_phase is not None:
        payload = mode.payloads[message_type].decode(raw)
    elif mode.unlisted_transitions is not None:
        by_phase, payload = mode.unlisted_transitions, raw
    else:
        raise Reject("InvalidPayload", detail=f"{mode.name} has no message type {message_type}")
    transition = by_phase.get(session.phase)
    if transition is None:
        raise Reject("InvalidPayload", detail=f"{message_type} is not accepted in phase {session.phase}")
    ctx = HookContext(session, sender, message_type, payload, raw, timestamp_ms)
    for guard in transition.guards:
        if not guard.check(ctx):
            raise Reject(guard.reject, *((guard.why,) if guard.reject == "PolicyDenied" else ()),
                         detail=guard.why)
    if transition.commit:
        if transition.ready is not None and not transition.ready(ctx):
            raise Reject("InvalidPayload",
                         detail=f"the session is not ready for a Commitment: {hook_text(transition.ready)}")
        if transition.policy is not None:
            reasons = transition.policy(ctx)
            if reasons:
                raise Reject("PolicyDenied", *reasons)
    state = session.state
    txn = None
    if transition.effects:   # on a copy: the live session's state is only replaced after the commit
        if type(state) is dict:
            txn = _Txn()
            ctx.state = StateCopy(state, txn)
        else:
            ctx.state = copy_state(state)
        for effect in transition.effects:
            effect(ctx)
    phase = transition.branches[-1].phase
    for branch in transition.branches:   # what the machine's event would pick: the first branch that holds
        if branch.when is None or branch.when(ctx):
            phase = branch.phase
            break
    resolution = None
    if transition.commit:
        resolution = transition.resolution(ctx) if transition.resolution is not None else ctx.raw
        if not isinstance(resolution, (bytes, bytearray)):
            raise TypeError(f"the resolution hook returned {type(resolution).__name__}, not bytes")
    if txn is not None:
        txn.open = False   # the copies become plain values of the next state
    state = dict(ctx.state) if type(ctx.state) is StateCopy else ctx.state
    return Next(transition, ctx, state, phase, resolution)


# --- the mode state, copied lazily while a message is judged ---------------------------------------

def copy_state(value):
    """A deep copy of a mode state value: dicts, lists and sets are copied; everything else (strings,
    numbers, tuples, decoded payloads) is shared as immutable."""
    kind = type(value)
    if kind is dict or kind is StateCopy:
        return {k: copy_state(v) for k, v in dict.items(value)}
    if kind is list or kind is ListCopy:
        return [copy_state(v) for v in list.__iter__(value)]
    if kind is set:
        return set(value)
    return value


class _Txn:
    """One judging: the copies made for it are writable copies only while it is open."""

    __slots__ = ("open",)

    def __init__(self):
        self.open = True


def _take(container, value, txn, store):
    """`value` as the open judging may change it: a copy of its own (made once, shallow, by C), the
    live value stays as it was."""
    kind = type(value)
    if kind is dict or kind is list or kind is set or (
            (kind is StateCopy or kind is ListCopy) and value._txn is not txn):
        value = StateCopy(value, txn) if kind is dict or kind is StateCopy else \
            ListCopy(value, txn) if kind is list or kind is ListCopy else set(value)
        store(value)
    return value


class StateCopy(dict):
    """The mode state as effects, phase conditions and the resolution see it: copied lazily along the
    paths hooks touch. Each dict or list is copied (shallow, in C) the first time it is reached, so a
    message that adds one entry to a large state copies only the containers on the way to it, and
    big strings and payloads are never copied at all. The live state is never changed. Once the
    judging is over (`_txn.open` false) a StateCopy left in the state behaves as a plain dict."""

    __slots__ = ("_txn",)

    def __init__(self, live, txn: _Txn):
        dict.__init__(self, live)
        self._txn = txn

    def _own(self, key):
        value = dict.__getitem__(self, key)
        txn = self._txn
        if not txn.open:
            return value
        return _take(self, value, txn, lambda v: dict.__setitem__(self, key, v))

    def __getitem__(self, key):
        return self._own(key)

    def get(self, key, default=None):
        return self._own(key) if key in self else default

    def setdefault(self, key, default=None):
        if key in self:
            return self._own(key)
        dict.__setitem__(self, key, default)
        return default

    def pop(self, key, *default):
        if key in self:
            value = self._own(key)
            dict.__delitem__(self, key)
            return value
        return dict.pop(self, key, *default)

    def items(self):
        if not self._txn.open:
            return dict.items(self)
        return [(k, self._own(k)) for k in list(dict.keys(self))]

    def values(self):
        if not self._txn.open:
            return dict.values(self)
        return [self._own(k) for k in list(dict.keys(self))]

    def copy(self):
        return dict(self.items())


class ListCopy(list):
    """A list of the mode state, copied lazily like StateCopy (elements on access or iteration)."""

    __slots__ = ("_txn",)

    def __init__(self, live, txn: _Txn):
        list.__init__(self, list.__iter__(live))
        self._txn = txn

    def _own(self, index):
        value = list.__getitem__(self, index)
        txn = self._txn
        if not txn.open:
            return value
        return _take(self, value, txn, lambda v: list.__setitem__(self, index, v))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._own(i) for i in range(*index.indices(len(self)))]
        return self._own(index)

    def __iter__(self):
        if not self._txn.open:
            return list.__iter__(self)
        return (self._own(i) for i in range(len(self)))

    def pop(self, index=-1):
        value = self._own(index)
        list.pop(self, index)
        return value

    def copy(self):
        return list(self.__iter__())
