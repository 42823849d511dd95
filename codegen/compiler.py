"""Check a loaded spec and compile it into one shared `transitions` machine plus hook tables.

`compile_spec` is called once per mode when the runtime starts (or when a mode is registered);
sessions never construct machines: each session only holds its current phase and mode state, and
the engine fires the shared machine's events against it.
"""
from __future__ import annotations

import functools
import gc
import glob
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import pkgutil
from typing import Any, Callable

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2
from transitions import Machine

from ..specs import SPECS_DIR
from ..specs.hooks.context import HookContext, Reject
from ..specs.hooks.contract import describe
from .errors import SpecError
from .loader import LineDict, load_spec_file
from .model import BUILTIN_ROLES, Branch, Guard, PayloadBinding, Transition
from .validate import SpecErrors, suggest, validate_spec

HOOKS_PACKAGE = "macp_runtime.specs.hooks"

# transitions logs every state entry/exit at INFO; at thousands of messages a second that is most of
# the per-message cost and says nothing the runtime's own logs do not.
logging.getLogger("transitions").setLevel(logging.WARNING)
TOP_KEYS = {
    "spec_version", "mode", "version", "standards_track", "strict_start", "descriptor", "hooks",
    "payloads", "roles", "session_start", "state", "phases", "unlisted_messages", "transitions", "commitment",
    "list_position", "policy_rules",
}
REQUIRED_TOP = ("spec_version", "mode", "version", "descriptor", "phases", "transitions", "commitment")
DESCRIPTOR_KEYS = {
    "title", "description", "determinism_class", "participant_model", "message_types",
    "terminal_message_types", "schema_uris",
}
TRANSITION_KEYS = {"message", "from", "to", "senders", "guards", "effects"}
COMMITMENT_KEYS = TRANSITION_KEYS | {"ready", "policy", "resolution"}
GUARD_KEYS = {"check", "reject", "why"}
UNLISTED_KEYS = {"from", "to", "guards", "effects"}
# The machine event of `unlisted_messages.accept` (not a message type: message types are looked up first).
UNLISTED_EVENT = "<unlisted>"


class CompiledMode:
    """One mode, ready to run. Shared by every session of the mode; holds no session data."""

    def __init__(self, *, name, version, descriptor, standards_track, list_position, strict_start, source, machine,
                 initial_phase, phases, transitions, roles, unlisted_senders, payloads, start_checks,
                 initial_state, spec, policy_schema=None, unlisted_transitions=None):
        self.name: str = name
        self.version: str = version
        self.descriptor: core_pb2.ModeDescriptor = descriptor
        self.standards_track: bool = standards_track
        self.list_position: int = list_position   # ListModes order of the standards-track modes
        self.strict_start: bool = strict_start
        self.source: str = source
        self.machine: Machine = machine
        self.initial_phase: str = initial_phase
        self.phases: tuple[str, ...] = phases
        # message type -> {phase -> Transition}; authorisation is per message type.
        self.transitions: dict[str, dict[str, Transition]] = transitions
        self.senders: dict[str, tuple[Callable[[Any, str], bool], ...]] = roles
        self.unlisted_senders = unlisted_senders
        # {phase -> Transition} for message types the spec does not list (`unlisted_messages.accept`),
        # or None when such types are refused; their payload is the raw bytes.
        self.unlisted_transitions: dict[str, Transition] | None = unlisted_transitions
        self.payloads: dict[str, PayloadBinding] = payloads
        self.start_checks = start_checks
        self.initial_state = initial_state
        self.spec: dict = spec
        self.policy_schema: dict | None = policy_schema   # rule groups a bound policy may set
        # Identifies the spec text a session starts under (runtime/spec_archive.py keeps old ones).
        source = getattr(spec, "source", None)
        self.source_text: str | None = source
        self.digest: str = hashlib.sha256(
            (source if source is not None else json.dumps(spec, sort_keys=True, default=str)).encode()).hexdigest()
        self._events = {msg: machine.events[msg] for msg in transitions}
        if unlisted_transitions is not None:
            self._events[UNLISTED_EVENT] = machine.events[UNLISTED_EVENT]

    # -- the two steps the engine runs around the commit point ------------------------------------

    def may_send(self, session, sender: str, message_type: str) -> bool:
        """The authorisation step of `evaluate` alone (no payload is looked at)."""
        allowed = self.senders.get(message_type, self.unlisted_senders)
        return any(role(session, sender) for role in allowed)

    def evaluate(self, session, sender: str, message_type: str, raw: bytes, timestamp_ms: int) -> "Next":
        """Judge a message and compute the session's next state, without changing the session.

        Everything the mode decides runs here, before the commit point: roles, decoding, guards,
        readiness, policy, then the effects on a copy of the mode state, the next phase and the
        resolution. Raises Reject when the message is refused; a hook that raises anything else
        is a refusal too (InvalidModeState), so a broken hook can never leave a durable message
        the session cannot apply (replay takes the same path).
        """
        try:
            return self._judge(session, sender, message_type, raw, timestamp_ms)
        except Reject:
            raise
        except Exception as exc:   # a hook failed: refused before anything is durable
            raise Reject("InvalidModeState", detail=f"a hook of {self.name} failed on {message_type}: "
                                                    f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def _judge(self, session, sender, message_type, raw, timestamp_ms) -> "Next":
        allowed = self.senders.get(message_type, self.unlisted_senders)
        if not any(role(session, sender) for role in allowed):
            raise Reject("Forbidden", detail=f"{sender!r} may not send {message_type}")
        by_phase = self.transitions.get(message_type)
        if by_phase is not None:
            payload = self.payloads[message_type].decode(raw)
        elif self.unlisted_transitions is not None:
            by_phase, payload = self.unlisted_transitions, raw
        else:
            raise Reject("InvalidPayload", detail=f"{self.name} has no message type {message_type}")
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

    @staticmethod
    def apply(session, nxt: "Next") -> bytes | None:
        """Swap the judged next state in (after the record is durable). Returns the resolution bytes
        when the message commits the session. Runs no hook: it cannot fail."""
        session.state = nxt.state
        session.phase = nxt.phase
        return nxt.resolution

    def check_start(self, session) -> None:
        for check in self.start_checks:
            if not check(session):
                raise Reject("InvalidPayload", detail=f"SessionStart refused by {self.name}: {hook_text(check)}")


class Next:
    """A judged message: the transition it takes and the session's state, phase and resolution after it."""

    __slots__ = ("transition", "ctx", "state", "phase", "resolution")

    def __init__(self, transition, ctx, state, phase, resolution):
        self.transition = transition
        self.ctx = ctx
        self.state = state
        self.phase = phase
        self.resolution = resolution


_CONTAINERS = (dict, list, set)


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


# --- compilation ---------------------------------------------------------------------------------

class _Ctx:
    """Error context while compiling one file."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, node: Any, path: str, message: str, key: Any = None) -> SpecError:
        line = None
        if isinstance(node, LineDict):
            line = node.lines.get(key, node.line) if key is not None else node.line
        return SpecError(self.file, path, message, line)


def _proto_pool():
    import macp

    for info in pkgutil.walk_packages(macp.__path__, "macp."):
        if info.name.endswith("_pb2"):
            importlib.import_module(info.name)
    return descriptor_pool.Default()


_POOL = None


def _message_class(full_name: str):
    global _POOL
    if _POOL is None:
        _POOL = _proto_pool()
    try:
        desc = _POOL.FindMessageTypeByName(full_name)
    except KeyError:
        return None
    return message_factory.GetMessageClass(desc)


def _proto_decoder(cls) -> Callable[[bytes], Any]:
    from_string = cls.FromString

    def decode(raw: bytes):
        try:
            return from_string(raw)
        except (DecodeError, ValueError, UnicodeDecodeError):
            raise Reject("InvalidPayload", detail=f"payload is not a valid {cls.DESCRIPTOR.full_name}") from None

    return decode


class _HookResolver:
    def __init__(self, ctx: _Ctx, spec_dir: str, module_ref: str | None):
        self.ctx = ctx
        self.modules = []
        if module_ref:
            self.modules.append(self._load(module_ref, spec_dir))
        self.common = importlib.import_module(f"{HOOKS_PACKAGE}.common")
        self._memo: dict = {}

    def _load(self, ref: str, spec_dir: str):
        try:
            if ref.endswith(".py"):
                path = ref if os.path.isabs(ref) else os.path.join(spec_dir, ref)
                name = "macp_runtime_user_hooks_" + os.path.splitext(os.path.basename(path))[0]
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or not os.path.exists(path):
                    raise ImportError(f"no such file {path}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
            return importlib.import_module(f"{HOOKS_PACKAGE}.{ref}")
        except ImportError as exc:
            raise SpecError(self.ctx.file, "hooks", f"cannot load hook module {ref!r}: {exc}") from None
        except Exception as exc:   # a user module that fails while loading: say so, no traceback
            raise SpecError(self.ctx.file, "hooks",
                            f"hook module {ref!r} failed to load: {type(exc).__name__}: {exc}") from None

    def find(self, name: str) -> tuple[Callable | None, str | None]:
        """(the hook, None), or (None, why not — with the known hooks and the nearest name)."""
        if "." in name:
            mod_name, _, attr = name.rpartition(".")
            module = self.common if mod_name == "common" else _hook_module(mod_name)
            if module is None:
                return None, f"unknown hook module {mod_name!r} in {name!r}{suggest(mod_name, hook_module_names(), 'modules')}"
            fn = getattr(module, attr, None)
            if callable(fn) and not attr.startswith("_"):
                return fn, None
            known = [f"{mod_name}.{n}" for n in module_hooks(module)]
            return None, f"hook {name!r} does not exist{suggest(name, known, 'hooks')}; `macp-runtime hooks` lists them"
        for module in self.modules:
            fn = getattr(module, name, None)
            if callable(fn):
                return fn, None
        known = [n for module in self.modules for n in module_hooks(module)]
        elsewhere = [f"{m}.{name}" for m in hook_module_names() if callable(getattr(_hook_module(m), name, None))]
        if elsewhere and not known:
            return None, f"hook {name!r} does not exist: bare names come from the spec's `hooks` module; did you mean {elsewhere[0]!r}?"
        return None, f"hook {name!r} does not exist{suggest(name, known + elsewhere, 'hooks')}"

    def get(self, node, path: str, name: Any, key=None) -> Callable:
        """A hook reference resolved (memoised: a generated spec names the same hooks many times)."""
        arity = 2 if path.startswith("roles.") or path.startswith("roles[") else 1
        try:
            memo_key = (json.dumps(name, sort_keys=True, default=str), arity, key == "hook")
        except (TypeError, ValueError):
            memo_key = None
        if memo_key is not None:
            hit = self._memo.get(memo_key)
            if hit is not None:
                return hit
        fn = self._get(node, path, name, key)
        if memo_key is not None:
            self._memo[memo_key] = fn
        return fn

    def _get(self, node, path: str, name: Any, key=None) -> Callable:
        """Resolve a hook reference: `name`, `module.name`, or `{hook: name, <param>: value, ...}`.

        The mapping form binds parameters, so one generic hook serves many specs
        (e.g. `{hook: generic.all_participants_sent, message: SignOff}`).
        """
        arity = 2 if path.startswith("roles.") or path.startswith("roles[") else 1
        if isinstance(name, dict):
            params = {k: v for k, v in name.items() if k != "hook"}
            fn = self.get(name, path, name.get("hook"), "hook")
            try:
                inspect.signature(fn).bind(*([None] * arity), **params)
            except (TypeError, ValueError) as exc:
                raise self.ctx.fail(name, path, f"bad parameters for hook {name.get('hook')!r}: {exc}") from None
            bound = functools.partial(fn, **params)
            bound.__name__ = hook_label(name)
            bound.__doc__ = fn.__doc__
            bound.__macp_text__ = describe(fn, params)
            return bound
        if not isinstance(name, str) or not name:
            raise self.ctx.fail(node, path, "a hook name must be a non-empty string or {hook: name, ...}", key)
        if "." in name:
            mod_name, _, attr = name.rpartition(".")
            if not mod_name.isidentifier():
                raise self.ctx.fail(node, path, f"unknown hook module {mod_name!r} in {name!r}", key)
            if mod_name == "common":
                module = self.common
            else:
                try:
                    module = importlib.import_module(f"{HOOKS_PACKAGE}.{mod_name}")
                except ImportError:
                    raise self.ctx.fail(node, path, f"unknown hook module {mod_name!r} in {name!r}", key) from None
            fn = _public_function(module, attr)
        else:
            fn = None
            for module in self.modules:
                fn = _public_function(module, name)
                if fn is not None:
                    break
        if fn is None:
            raise self.ctx.fail(node, path, f"hook {name!r} does not exist (a hook is a public function defined "
                                            f"in its hook module)", key)
        if key != "hook":   # the {hook: ..., params} form checks its signature with the parameters above
            try:
                inspect.signature(fn).bind(*([None] * arity))
            except (TypeError, ValueError):
                raise self.ctx.fail(node, path, f"hook {name!r} does not take {arity} argument(s) as a "
                                                f"{'role' if arity == 2 else 'hook'} here", key) from None
        return fn


def _hook_module(name: str):
    if name.startswith("_") or name in ("context", "contract"):
        return None
    try:
        return importlib.import_module(f"{HOOKS_PACKAGE}.{name}")
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def _hook_module_names() -> tuple[str, ...]:
    from ..specs import hooks as hooks_pkg

    return tuple(m.name for m in pkgutil.iter_modules(hooks_pkg.__path__)
                 if not m.name.startswith("_") and m.name not in ("context", "contract"))


def hook_module_names() -> list[str]:
    """The built-in hook modules (`generic`, `common`, one per built-in mode, ...)."""
    return list(_hook_module_names())


def module_hooks(module) -> list[str]:
    """The public functions a hook module defines (not the ones it imports)."""
    return sorted(n for n, f in vars(module).items()
                  if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__
                  and (hasattr(f, "__macp_hook__") or _first_param(f) in ("ctx", "session", "raw")))


def _first_param(fn) -> str:
    params = list(inspect.signature(fn).parameters)
    return params[0] if params else ""


def hook_text(fn: Callable) -> str:
    """What a resolved hook checks, in prose with its parameters filled in (reasons, docs)."""
    text = getattr(fn, "__macp_text__", None)
    return text if text is not None else describe(fn)


def _public_function(module, attr: str):
    """`module.attr` when it is a public function defined in that module itself (not one it imports,
    not a class, not a private helper), else None."""
    if not isinstance(attr, str) or not attr or attr.startswith("_"):
        return None
    fn = getattr(module, attr, None)
    if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
        return None
    return fn


def hook_label(ref: Any) -> str:
    """How a hook reference reads in docs and messages: `name` or `name(param=value, ...)`."""
    if isinstance(ref, dict):
        params = ", ".join(f"{k}={v}" for k, v in ref.items() if k != "hook")
        return f"{ref.get('hook')}({params})"
    return str(ref)


def _json_object(raw: bytes):
    try:
        value = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Reject("InvalidPayload", detail="payload is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise Reject("InvalidPayload", detail="payload must be a JSON object")
    return value


def _opaque(raw: bytes) -> bytes:
    return raw


# Payload bindings that need no protobuf message: for modes written in YAML only.
BUILTIN_PAYLOADS = {"json": _json_object, "opaque": _opaque}

# `payloads.<type>.fields.<name>.type` of a described JSON payload -> the check the decoder applies
JSON_FIELD_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}
_ARTICLE = {"integer": "an integer", "object": "an object", "array": "an array", "any": "any value"}


def _typed_json(fields: dict) -> Callable[[bytes], Any]:
    """A JSON decoder that also checks the described fields: required ones present, each of its type."""
    checks = [(name, JSON_FIELD_TYPES[d.get("type", "any")], d.get("type", "any"), bool(d.get("required", False)))
              for name, d in fields.items()]

    def decode(raw: bytes):
        value = _json_object(raw)
        for name, ok, kind, required in checks:
            if name not in value:
                if required:
                    raise Reject("InvalidPayload", detail=f"payload field {name!r} is required")
            elif not ok(value[name]):
                raise Reject("InvalidPayload",
                             detail=f"payload field {name!r} must be {_ARTICLE.get(kind, 'a ' + kind)}")
        return value

    return decode


def _require(ctx: _Ctx, node: dict, key: str, path: str, kind, what: str):
    if key not in node:
        raise ctx.fail(node, path, f"missing required key {key!r}")
    value = node[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ctx.fail(node, f"{path}.{key}" if path else key, f"must be {what}", key)
    return value


def _opt_str(ctx: _Ctx, node: dict, key, path: str) -> str:
    """An optional text value: a string (numbers are taken as written), never a list or mapping."""
    value = node.get(key, "")
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.fail(node, f"{path}.{key}", "must be a string", key)
    return str(value)


def _scalar_str(ctx: _Ctx, node: dict, key, path: str) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int, float)):
        raise ctx.fail(node, path, f"keys must be strings, got {type(key).__name__}")
    return str(key)


def _unknown_keys(ctx: _Ctx, node: dict, allowed: set, path: str):
    for key in node:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ctx.fail(node, where, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})", key)


def _hook_list(ctx: _Ctx, node: dict, key: str, path: str) -> list:
    """An optional list of hook references (names or {hook: ..., params})."""
    value = node.get(key, [])
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
        raise ctx.fail(node, f"{path}.{key}", "must be a list of hook names or {hook: name, ...}", key)
    return value


def _str_list(ctx: _Ctx, node: dict, key: str, path: str, required=True) -> list[str]:
    if key not in node:
        if required:
            raise ctx.fail(node, path, f"missing required key {key!r}")
        return []
    value = node[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.fail(node, f"{path}.{key}", "must be a list of strings", key)
    return value


def compile_spec(spec: LineDict, file: str = "<spec>", overrides: dict | None = None, *,
                 validate: bool = True) -> CompiledMode:
    """Validate `spec` (as returned by the loader) and build its CompiledMode. Raises SpecError only:
    whatever else a spec provokes (a message type that collides with a machine attribute, a value of
    an unexpected type, nesting too deep) is reported as a SpecError too."""
    # A large spec allocates many long-lived objects and frees none: cyclic GC passes over them would
    # make the compile time grow faster than the spec.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _compile_spec(spec, file, overrides, validate)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, "", "the spec is nested too deeply") from None
    except Exception as exc:
        raise SpecError(file, "", f"the spec cannot be compiled: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        if collecting:
            gc.enable()


def _compile_spec(spec: LineDict, file: str, overrides: dict | None, validate: bool = True) -> CompiledMode:
    ctx = _Ctx(file)
    if not isinstance(spec, dict):
        raise ctx.fail(None, "", "a mode spec must be a mapping")
    # Every problem of the file at once (schema + cross-references); the checks below stay as a backstop.
    spec_dir = os.path.dirname(os.path.abspath(file)) if os.path.exists(file) else SPECS_DIR
    problems: list[SpecError] = []
    resolver = None
    try:
        resolver = _HookResolver(ctx, spec_dir, spec.get("hooks") if isinstance(spec.get("hooks"), str) else None)
    except SpecError as exc:
        problems.append(SpecError(exc.file, exc.path, exc.message,
                                  exc.line or (spec.lines.get("hooks") if isinstance(spec, LineDict) else None)))
    if validate:   # a spec generated from a template the runtime ships (passthrough) skips the schema pass
        problems += validate_spec(spec, file, resolver.find if resolver is not None else None)
    if problems:
        raise SpecErrors(problems)
    for key in REQUIRED_TOP:
        if key not in spec:
            raise ctx.fail(spec, "", f"missing required key {key!r}")
    _unknown_keys(ctx, spec, TOP_KEYS, "")
    if spec["spec_version"] != 1:
        raise ctx.fail(spec, "spec_version", "only spec_version 1 is understood", "spec_version")
    name = _require(ctx, spec, "mode", "", str, "a string")
    if not isinstance(spec["version"], (str, int, float)) or isinstance(spec["version"], bool):
        raise ctx.fail(spec, "version", "must be a string", "version")
    version = str(spec["version"])
    overrides = overrides or {}
    if overrides.get("mode"):
        name = overrides["mode"]
    standards_track = bool(spec.get("standards_track", False))
    list_position = spec.get("list_position", 1000)
    if not isinstance(list_position, int) or isinstance(list_position, bool):
        raise ctx.fail(spec, "list_position", "must be an integer", "list_position")
    strict_start = bool(spec.get("strict_start", True))
    if spec.get("hooks") is not None and not isinstance(spec["hooks"], str):
        raise ctx.fail(spec, "hooks", "must be a hook module name or a .py path", "hooks")
    hooks = resolver

    # descriptor
    desc_node = _require(ctx, spec, "descriptor", "", dict, "a mapping")
    _unknown_keys(ctx, desc_node, DESCRIPTOR_KEYS, "descriptor")
    message_types = _str_list(ctx, desc_node, "message_types", "descriptor")
    terminal_types = _str_list(ctx, desc_node, "terminal_message_types", "descriptor", required=False)
    declared_types = frozenset(message_types)   # membership tests stay O(1) for specs with many types
    for t in terminal_types:
        if t not in declared_types:
            raise ctx.fail(desc_node, "descriptor.terminal_message_types",
                           f"terminal message type {t!r} must also appear in message_types", "terminal_message_types")
    schema_uris = desc_node.get("schema_uris", {}) or {}
    if not isinstance(schema_uris, dict):
        raise ctx.fail(desc_node, "descriptor.schema_uris", "must be a mapping", "schema_uris")
    descriptor = core_pb2.ModeDescriptor(
        mode=name, mode_version=version,
        title=_opt_str(ctx, desc_node, "title", "descriptor"),
        description=_opt_str(ctx, desc_node, "description", "descriptor"),
        determinism_class=_opt_str(ctx, desc_node, "determinism_class", "descriptor"),
        participant_model=_opt_str(ctx, desc_node, "participant_model", "descriptor"),
        message_types=message_types, terminal_message_types=terminal_types,
        schema_uris={_scalar_str(ctx, schema_uris, k, "descriptor.schema_uris"): _opt_str(ctx, schema_uris, k,
                                                                                         "descriptor.schema_uris")
                     for k in schema_uris},
    )

    # phases
    phases_node = _require(ctx, spec, "phases", "", dict, "a mapping")
    _unknown_keys(ctx, phases_node, {"initial", "names"}, "phases")
    phase_names = _str_list(ctx, phases_node, "names", "phases")
    if len(set(phase_names)) != len(phase_names):
        raise ctx.fail(phases_node, "phases.names", "phase names must be unique", "names")
    initial = _require(ctx, phases_node, "initial", "phases", str, "a phase name")
    if initial not in phase_names:
        raise ctx.fail(phases_node, "phases.initial", f"initial phase {initial!r} is not in phases.names", "initial")

    # roles
    roles_node = spec.get("roles", {}) or {}
    if not isinstance(roles_node, dict):
        raise ctx.fail(spec, "roles", "must be a mapping of role name to hook", "roles")
    role_fns: dict[str, Callable[[Any, str], bool]] = {
        "initiator": lambda s, sender: sender == s.initiator,
        "participant": lambda s, sender: sender in s.participant_set,
        "anyone": lambda s, sender: True,
    }
    for role, hook_name in roles_node.items():
        if role in BUILTIN_ROLES:
            raise ctx.fail(roles_node, f"roles.{role}", f"{role!r} is a built-in role and cannot be redefined", role)
        role_fns[role] = hooks.get(roles_node, f"roles.{role}", hook_name, role)

    def senders_of(node, path) -> tuple:
        names = _str_list(ctx, node, "senders", path)
        for r in names:
            if r not in role_fns:
                raise ctx.fail(node, f"{path}.senders", f"unknown role {r!r} (known: {', '.join(sorted(role_fns))})",
                               "senders")
        return tuple(role_fns[r] for r in names), tuple(names)

    # payloads
    payload_node = spec.get("payloads", {}) or {}
    if not isinstance(payload_node, dict):
        raise ctx.fail(spec, "payloads", "must be a mapping of message type to payload message", "payloads")
    payloads: dict[str, PayloadBinding] = {}
    for msg, ref in payload_node.items():
        path = f"payloads.{msg}"
        if isinstance(ref, dict) and "decode" not in ref:
            _unknown_keys(ctx, ref, {"type", "description", "fields"}, path)
            kind = ref.get("type")
            if kind not in BUILTIN_PAYLOADS and (not isinstance(kind, str) or _message_class(kind) is None):
                raise ctx.fail(ref, f"{path}.type", f"must be json, opaque or a protobuf message name, not {kind!r}",
                               "type")
            fields = ref.get("fields") or {}
            if fields and kind != "json":
                raise ctx.fail(ref, f"{path}.fields", "fields are described for json payloads only", "fields")
            if not isinstance(fields, dict):
                raise ctx.fail(ref, f"{path}.fields", "must be a mapping of field name to {type, description}", "fields")
            for fname, fdesc in fields.items():
                if not isinstance(fdesc, dict):
                    raise ctx.fail(fields, f"{path}.fields.{fname}", "must be a mapping with type and description", fname)
                _unknown_keys(ctx, fdesc, {"type", "description", "required"}, f"{path}.fields.{fname}")
                if fdesc.get("type", "any") not in JSON_FIELD_TYPES:
                    raise ctx.fail(fdesc, f"{path}.fields.{fname}.type",
                                   f"unknown field type {fdesc.get('type')!r} (known: {', '.join(JSON_FIELD_TYPES)})",
                                   "type")
            if kind == "json":
                decode = _typed_json(fields) if fields else _json_object
                payloads[msg] = PayloadBinding(msg, "json", decode)
            elif kind == "opaque":
                payloads[msg] = PayloadBinding(msg, "opaque", _opaque)
            else:
                payloads[msg] = PayloadBinding(msg, kind, _proto_decoder(_message_class(kind)))
        elif isinstance(ref, dict):
            _unknown_keys(ctx, ref, {"decode"}, path)
            fn = hooks.get(ref, f"{path}.decode", ref.get("decode"), "decode")
            payloads[msg] = PayloadBinding(msg, f"hook:{ref.get('decode')}", fn)
        elif isinstance(ref, str) and ref in BUILTIN_PAYLOADS:
            payloads[msg] = PayloadBinding(msg, ref, BUILTIN_PAYLOADS[ref])
        elif isinstance(ref, str):
            cls = _message_class(ref)
            if cls is None:
                raise ctx.fail(payload_node, path, f"unknown protobuf message {ref!r}", msg)
            payloads[msg] = PayloadBinding(msg, ref, _proto_decoder(cls))
        else:
            raise ctx.fail(payload_node, path, "must be a protobuf message name, json, opaque or {decode: hook}", msg)

    # session start and state
    start_node = spec.get("session_start", {}) or {}
    _unknown_keys(ctx, start_node, {"requires"}, "session_start")
    start_checks = tuple(hooks.get(start_node, "session_start.requires", h, "requires")
                         for h in _hook_list(ctx, start_node, "requires", "session_start"))
    state_node = spec.get("state", {}) or {}
    _unknown_keys(ctx, state_node, {"initial"}, "state")
    initial_state = (hooks.get(state_node, "state.initial", state_node["initial"], "initial")
                     if "initial" in state_node else (lambda session: {}))

    # The governance rule schema the mode reads (documentation and `check`; hooks parse it themselves).
    policy_schema = None
    if "policy_rules" in spec:
        ref = spec["policy_rules"]
        mod_name, _, attr = str(ref).rpartition(".")
        try:
            policy_schema = getattr(importlib.import_module(f"{HOOKS_PACKAGE}.{mod_name}"), attr, None)
        except ImportError:
            policy_schema = None
        if not isinstance(policy_schema, dict):
            raise ctx.fail(spec, "policy_rules", f"unknown rule schema {ref!r} (expected e.g. policy_rules.DECISION_SCHEMA)",
                           "policy_rules")

    unlisted = spec.get("unlisted_messages", {}) or {}
    _unknown_keys(ctx, unlisted, {"senders", "accept"}, "unlisted_messages")
    unlisted_senders = senders_of(unlisted, "unlisted_messages")[0] if "senders" in unlisted else ()
    if "accept" in unlisted and "senders" not in unlisted:
        raise ctx.fail(unlisted, "unlisted_messages.accept", "accepting unlisted messages needs unlisted_messages.senders",
                       "accept")

    # transitions
    machine = Machine(model=None, states=list(phase_names), initial=initial, auto_transitions=False,
                      send_event=True, model_attribute="phase", ignore_invalid_triggers=False)
    transitions: dict[str, dict[str, Transition]] = {}
    senders: dict[str, tuple] = {}
    sender_names: dict[str, tuple] = {}
    nodes = spec["transitions"]
    if not isinstance(nodes, list):
        raise ctx.fail(spec, "transitions", "must be a list", "transitions")
    entries = [(f"transitions[{i}]", node, False) for i, node in enumerate(nodes)]
    entries.append(("commitment", spec["commitment"], True))
    if "accept" in unlisted:
        entries.append(("unlisted_messages.accept", unlisted["accept"], None))
    unlisted_transitions = None
    for path, node, is_commit in entries:
        if not isinstance(node, dict):
            raise ctx.fail(spec, path, "must be a mapping")
        if is_commit is None:   # unlisted_messages.accept: any message type no transition names, raw payload
            _unknown_keys(ctx, node, UNLISTED_KEYS, path)
            sources = _str_list(ctx, node, "from", path)
            for p in sources:
                if p not in phase_names:
                    raise ctx.fail(node, f"{path}.from", f"unknown phase {p!r}", "from")
            t = _transition(ctx, hooks, node, path, UNLISTED_EVENT, sources, phase_names, False)
            unlisted_transitions = {p: t for p in sources}
            _add_machine_transitions(machine, t)
            continue
        _unknown_keys(ctx, node, COMMITMENT_KEYS if is_commit else TRANSITION_KEYS, path)
        msg = _require(ctx, node, "message", path, str, "a message type")
        if msg == "SessionStart":
            raise ctx.fail(node, f"{path}.message", "SessionStart is handled by the engine, not by transitions", "message")
        if msg not in declared_types:
            raise ctx.fail(node, f"{path}.message", f"message type {msg!r} is not in descriptor.message_types", "message")
        if msg not in payloads:
            raise ctx.fail(node, f"{path}.message", f"message type {msg!r} has no payload binding in payloads", "message")
        sources = _str_list(ctx, node, "from", path)
        for p in sources:
            if p not in phase_names:
                raise ctx.fail(node, f"{path}.from", f"unknown phase {p!r}", "from")
        fns, names = senders_of(node, path)
        if msg in sender_names and sender_names[msg] != names:
            raise ctx.fail(node, f"{path}.senders",
                           f"all transitions on {msg!r} must name the same senders (authorisation runs before the phase is known)",
                           "senders")
        senders[msg], sender_names[msg] = fns, names
        t = _transition(ctx, hooks, node, path, msg, sources, phase_names, is_commit)
        if is_commit:
            for key in ("ready", "policy", "resolution"):
                if key in node:
                    setattr(t, key, hooks.get(node, f"{path}.{key}", node[key], key))
                    setattr(t, f"{key}_name", hook_label(node[key]))
        by_phase = transitions.setdefault(msg, {})
        for p in sources:
            if p in by_phase:
                raise ctx.fail(node, f"{path}.from", f"phase {p!r} already has a transition on {msg!r}", "from")
            by_phase[p] = t
        _add_machine_transitions(machine, t)

    return CompiledMode(
        name=name, version=version, descriptor=descriptor, standards_track=standards_track,
        list_position=list_position, strict_start=strict_start, source=file, machine=machine, initial_phase=initial,
        phases=tuple(phase_names), transitions=transitions, roles=senders, unlisted_senders=unlisted_senders,
        payloads=payloads, start_checks=start_checks, initial_state=initial_state, spec=spec,
        policy_schema=policy_schema, unlisted_transitions=unlisted_transitions,
    )


def _transition(ctx: _Ctx, hooks: _HookResolver, node: dict, path: str, msg: str, sources, phase_names,
                is_commit: bool) -> Transition:
    """The guards, effects and branches of one transition node."""
    branches = _branches(ctx, hooks, node, path, phase_names)
    guards = []
    for gi, g in enumerate(node.get("guards", []) or []):
        gpath = f"{path}.guards[{gi}]"
        if not isinstance(g, dict):
            raise ctx.fail(node, gpath, "a guard must be a mapping with check/reject/why", "guards")
        _unknown_keys(ctx, g, GUARD_KEYS, gpath)
        kind = g.get("reject", "InvalidPayload")
        if kind not in Reject.KINDS:
            raise ctx.fail(g, f"{gpath}.reject", f"unknown rejection {kind!r} (known: {', '.join(Reject.KINDS)})",
                           "reject")
        check = hooks.get(g, f"{gpath}.check", g.get("check"), "check")
        guards.append(Guard(check, kind, _opt_str(ctx, g, "why", gpath) or hook_text(check), hook_label(g.get("check"))))
    effect_refs = _hook_list(ctx, node, "effects", path)
    effects = tuple(hooks.get(node, f"{path}.effects", e, "effects") for e in effect_refs)
    effect_names = [hook_label(e) for e in effect_refs]
    return Transition(message=msg, sources=frozenset(sources), branches=branches, guards=tuple(guards),
                      effects=effects, effect_names=tuple(effect_names), commit=is_commit)


def _add_machine_transitions(machine: Machine, t: Transition) -> None:
    for b in t.branches:
        cond = [] if b.when is None else [_condition(b.when)]
        machine.add_transition(t.message, sorted(t.sources), b.phase, conditions=cond)


def _condition(fn):
    return lambda event_data: fn(event_data.args[0])


def _branches(ctx: _Ctx, hooks: _HookResolver, node: dict, path: str, phase_names) -> tuple[Branch, ...]:
    if "to" not in node:
        raise ctx.fail(node, path, "missing required key 'to'")
    to = node["to"]
    if isinstance(to, str):
        to = [{"phase": to}]
    if not isinstance(to, list) or not to:
        raise ctx.fail(node, f"{path}.to", "must be a phase name or a list of {phase, when} branches", "to")
    branches = []
    for i, b in enumerate(to):
        bpath = f"{path}.to[{i}]"
        if not isinstance(b, dict) or "phase" not in b:
            raise ctx.fail(node, bpath, "a branch must be a mapping with 'phase' (and 'when' except for the last)", "to")
        _unknown_keys(ctx, b, {"phase", "when"}, bpath)
        if b["phase"] not in phase_names:
            raise ctx.fail(b, f"{bpath}.phase", f"unknown phase {b['phase']!r}", "phase")
        when = hooks.get(b, f"{bpath}.when", b["when"], "when") if "when" in b else None
        is_last = i == len(to) - 1
        if when is None and not is_last:
            raise ctx.fail(b, bpath, "only the last branch may omit 'when'")
        if when is not None and is_last:
            raise ctx.fail(b, bpath, "the last branch must not have 'when' (some phase must always follow)")
        branches.append(Branch(b["phase"], when, hook_label(b["when"]) if "when" in b else None))
    return tuple(branches)


def load_modes(directories: list[str] | None = None) -> list[CompiledMode]:
    """Compile every `*.yaml` spec of the built-in folder, then of each extra directory, in name order.

    Raises SpecErrors with the problems of every file (not only the first file's first one)."""
    dirs = [SPECS_DIR] + list(directories or [])
    modes = []
    problems: list[SpecError] = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.yaml"))):
            try:
                modes.append(compile_spec(load_spec_file(path), path))
            except SpecError as exc:
                problems.extend(getattr(exc, "errors", [exc]))
    if problems:
        raise SpecErrors(problems)
    return modes
