"""What the console may see of the kernel: a read-only facade over the engine, the session table,
histories, compiled modes and the policy registry. Nothing here changes a session, appends a record
or records an expiry; every answer is plain JSON-able data.

Who may read what is the kernel's rule (`Engine.may_read`, the same one GetSession and StreamSession
subscribe apply): the initiator and the declared participants see their sessions, observers see all.
`ConsoleView.may_read` is the one place the console asks it.
"""
from __future__ import annotations

import base64
import json
import threading

from google.protobuf import json_format
from macp.v1 import core_pb2, envelope_pb2

from ...kernel import interpreter
from ...specs.hooks.context import Reject
from ...storage import ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, StorageError
from ...vocabulary.identity import Identity
from ...vocabulary.session import OPEN, RESOLVED, SUSPENDED, Session
from . import diagram

STATE_NAMES = {v.number: v.name.replace("SESSION_STATE_", "") for v in envelope_pb2.SessionState.DESCRIPTOR.values}
STATE_NUMBERS = {name: number for number, name in STATE_NAMES.items()}
EVENT_NAMES = {v.number: v.name.replace("EVENT_TYPE_", "")
               for v in core_pb2.SessionLifecycleEvent.EventType.DESCRIPTOR.values}
_INTERNAL_PAYLOADS = {"SessionCancel": core_pb2.SessionCancelPayload,
                      "SessionSuspend": core_pb2.SessionSuspendPayload,
                      "SessionResume": core_pb2.SessionResumePayload}
MAX_LIST = 5000   # sessions in one /api/sessions answer (newest first); the rest are counted


class NotVisible(Exception):
    """Unknown session, or one this identity may not read: both answer 404 (existence is not told)."""


def _proto_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def decode_payload(compiled, message_type: str, raw: bytes) -> tuple[str, object]:
    """(kind, value): kind is a protobuf full name, "json", "text" or "bytes"."""
    if not raw:
        return "empty", None
    try:
        if message_type == "SessionStart":
            return "macp.v1.SessionStartPayload", _proto_dict(core_pb2.SessionStartPayload.FromString(raw))
        cls = _INTERNAL_PAYLOADS.get(message_type)
        if cls is not None:
            return cls.DESCRIPTOR.full_name, _proto_dict(cls.FromString(raw))
        binding = compiled.payloads.get(message_type) if compiled is not None else None
        if binding is not None:
            value = binding.decode(raw)
            if hasattr(value, "DESCRIPTOR"):
                return value.DESCRIPTOR.full_name, _proto_dict(value)
            if isinstance(value, (dict, list, int, float, bool)) or value is None:
                return "json", value
    except Exception:   # shown as bytes below: a view must never fail on a payload
        pass
    return _loose(raw)


def _loose(raw: bytes) -> tuple[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes", {"base64": base64.b64encode(raw).decode()}
    try:
        return "json", json.loads(text)
    except ValueError:
        return "text", text


def decode_resolution(compiled, raw: bytes | None):
    if raw is None:
        return None
    if raw[:1] in (b"{", b"["):
        kind, value = _loose(raw)
        if kind == "json":
            return {"type": "json", "value": value}
    kind, value = decode_payload(compiled, "Commitment", raw)
    return {"type": kind, "value": value}


def summary(session: Session) -> dict:
    """The list row of a session (read without its lock: a torn read is corrected by the next event)."""
    activity = session.activity
    last = session.started_at_ms
    if activity:
        last = max(last, max(entry[1] for entry in list(activity.values())))
    return {
        "session_id": session.session_id, "mode": session.mode, "state": STATE_NAMES.get(session.status, "?"),
        "phase": session.phase, "initiator": session.initiator, "participants": list(session.participants),
        "started_at_ms": session.started_at_ms, "deadline_ms": session.deadline_ms, "last_activity_ms": last,
        "version": session.log_length,
    }


class ConsoleView:
    def __init__(self, engine, authenticator):
        self.engine = engine
        self.auth = authenticator
        self._docs_cache: dict[int, dict] = {}
        self._docs_lock = threading.Lock()

    # --- who is asking ------------------------------------------------------------------------------

    def identity(self, authorization: str | None) -> Identity | None:
        """The identity of an `Authorization: Bearer <token>` header, through the gRPC resolvers."""
        if not authorization:
            return None
        return self.auth.authenticate([("authorization", authorization)])

    def may_read(self, session: Session, identity: Identity) -> bool:
        # The kernel's rule, shared with GetSession / StreamSession subscribe.
        return self.engine.may_read(session, identity)

    # --- sessions -----------------------------------------------------------------------------------

    def sessions(self, identity: Identity, state: str = "", mode: str = "") -> dict:
        engine = self.engine
        engine.refresh_sessions()   # with a shared store, sessions other instances started (a no-op on one instance)
        want_state = STATE_NUMBERS.get(state.upper()) if state else None
        rows = [s for s in engine.sessions()
                if not s.gone and self.may_read(s, identity)
                and (want_state is None or s.status == want_state) and (not mode or s.mode == mode)]
        rows.sort(key=lambda s: s.started_at_ms, reverse=True)
        return {"sessions": [summary(s) for s in rows[:MAX_LIST]], "total": len(rows),
                "truncated": len(rows) > MAX_LIST}

    def _visible(self, session_id: str, identity: Identity) -> Session:
        session = self.engine.find(session_id)
        if session is None:   # maybe started through another instance sharing the store
            self.engine.refresh_sessions()
            session = self.engine.find(session_id)
        if session is None or not self.may_read(session, identity):
            raise NotVisible(session_id)
        return session

    def session(self, session_id: str, identity: Identity) -> dict:
        session = self._visible(session_id, identity)
        compiled = session.compiled
        history_error: str | None
        try:
            records = self.engine.store.history(session_id)
        except StorageError as exc:
            records, history_error = [], str(exc)
        else:
            history_error = None
        trail = phase_trail(session, records)
        history = []
        for index, rec in enumerate(records):
            entry = entry_dict(compiled, index, rec)
            if entry is None:
                continue
            if index in trail:
                entry["phase"] = trail[index]
            history.append(entry)
        now = self.engine.clock()
        out = summary(session)
        graph = diagram.phase_graph(compiled)
        out.update({
            "mode_version": session.mode_version, "configuration_version": session.configuration_version,
            "policy_version": session.policy_version, "intent": session.intent, "context_id": session.context_id,
            "ttl_ms": session.ttl_ms, "now_ms": now,
            "overdue": session.status == OPEN and now > session.deadline_ms,
            "suspended_at_ms": session.suspended_at_ms,
            "accumulated_suspended_ms": session.accumulated_suspended_ms,
            "activity": [{"participant": p, "count": c, "last_ms": t}
                         for p, (c, t) in sorted((session.activity or {}).items())],
            "resolution": decode_resolution(compiled, session.resolution),
            "history": history, "history_error": history_error,
            "path_known": bool(trail) or not records,
            "graph": graph, "diagram": diagram.svg(graph, f"{compiled.name} phases"),
        })
        return out

    def envelope(self, session_id: str, index: int, identity: Identity) -> tuple[dict, bytes]:
        """The raw log entry `index` of a session: (JSON form, serialized macp.v1.Envelope)."""
        self._visible(session_id, identity)
        try:
            records = self.engine.store.history(session_id)
        except StorageError as exc:
            raise NotVisible(f"{session_id}: {exc}") from None
        if not 0 <= index < len(records) or records[index].kind not in (ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL):
            raise NotVisible(f"{session_id}#{index}")
        rec = records[index]
        env = envelope_pb2.Envelope(
            macp_version=rec.macp_version or "1.0", mode=rec.mode, message_type=rec.message_type,
            message_id=rec.message_id, session_id=rec.session_id, sender=rec.sender,
            timestamp_unix_ms=rec.timestamp_unix_ms or rec.received_at_ms, payload=rec.payload)
        raw = env.SerializeToString()
        return {"index": index, "kind": "envelope" if rec.kind == ENTRY_KIND_INCOMING else "runtime",
                "received_at_ms": rec.received_at_ms,
                "envelope": json_format.MessageToDict(env, preserving_proto_field_name=True),
                "envelope_proto_base64": base64.b64encode(raw).decode()}, raw

    # --- modes and policies -------------------------------------------------------------------------

    def modes(self) -> list[dict]:
        registry = self.engine.modes
        out = []
        for name in registry.names:
            mode = registry.get(name)
            if mode is None:
                continue
            d = mode.descriptor
            out.append({"name": name, "title": d.title, "version": mode.version, "description": d.description,
                        "standards_track": mode.standards_track, "phases": list(mode.phases),
                        "message_types": list(d.message_types), "order": (not mode.standards_track,
                                                                           mode.list_position, name)})
        out.sort(key=lambda m: m.pop("order"))
        return out

    def mode(self, name: str) -> dict | None:
        mode = self.engine.modes.get(name)
        if mode is None:
            return None
        key = id(mode)
        with self._docs_lock:
            cached = self._docs_cache.get(key)
            if cached is not None and cached["_mode"] is mode:
                return cached["doc"]
        graph = diagram.phase_graph(mode)
        svg = diagram.svg(graph, f"{name} phases")
        doc = {"name": name, "title": mode.descriptor.title, "graph": graph, "legend": diagram.legend(graph),
               "diagram": svg, "html": mode_docs_html(mode, svg)}
        with self._docs_lock:
            self._docs_cache[key] = {"_mode": mode, "doc": doc}
        return doc

    def policies(self, mode: str = "") -> list[dict]:
        out = []
        for view in self.engine.policies.list(mode):
            try:
                rules = json.loads(view.rules)
            except ValueError:
                rules = view.rules
            out.append({"policy_id": view.policy_id, "mode": view.mode, "description": view.description,
                        "schema_version": view.schema_version, "rules": rules})
        return out


def entry_dict(compiled, index: int, rec) -> dict | None:
    """One history entry for the pages (checkpoints are not entries: they summarise earlier ones)."""
    if rec.kind == ENTRY_KIND_INCOMING:
        kind = "envelope"
    elif rec.kind == ENTRY_KIND_INTERNAL:
        kind = "runtime"
    else:
        return None
    payload_type, payload = decode_payload(compiled, rec.message_type, rec.payload)
    return {"index": index, "kind": kind, "message_type": rec.message_type, "message_id": rec.message_id,
            "sender": rec.sender, "timestamp_ms": rec.timestamp_unix_ms or rec.received_at_ms,
            "received_at_ms": rec.received_at_ms, "payload_type": payload_type, "payload": payload}


def phase_trail(session: Session, records) -> dict[int, str]:
    """Log index -> the phase the session was in after that entry, found by judging the history again
    through the session's compiled mode on a scratch copy (the live session is not touched). Empty
    when the history starts from a checkpoint (after a restart) or does not replay."""
    compiled = session.compiled
    first = next((i for i, r in enumerate(records)
                  if r.kind == ENTRY_KIND_INCOMING and r.message_type == "SessionStart"), None)
    if first is None or first != 0 and any(r.kind not in (ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL)
                                           for r in records[:first]):
        return {}
    start_rec = records[first]
    try:
        start = core_pb2.SessionStartPayload.FromString(start_rec.payload)
        scratch = Session(session.session_id, compiled, start_rec.sender, start, session.policy,
                          start_rec.received_at_ms, session.deadline_ms, session.policy_version)
    except Exception:
        return {}
    trail = {first: scratch.phase}
    for index in range(first + 1, len(records)):
        rec = records[index]
        if rec.kind == ENTRY_KIND_INCOMING and scratch.status == OPEN:
            try:
                plan = interpreter.evaluate(compiled, scratch, rec.sender, rec.message_type, rec.payload,
                                            rec.timestamp_unix_ms)
                scratch.note_activity(rec.sender, rec.received_at_ms)
                if interpreter.apply(scratch, plan) is not None:
                    scratch.status = RESOLVED   # terminal: nothing after it moves the phase
            except Reject:
                return trail
            except Exception:
                return trail
        elif rec.kind == ENTRY_KIND_INTERNAL and rec.message_type == "SessionSuspend":
            scratch.status = SUSPENDED
        elif rec.kind == ENTRY_KIND_INTERNAL and rec.message_type == "SessionResume":
            scratch.status = OPEN
        trail[index] = scratch.phase
    return trail


def mode_docs_html(mode, diagram_svg: str) -> str:
    """The page `macp-runtime docs` writes for this mode, as HTML, its Mermaid block replaced by the SVG."""
    from markdown_it import MarkdownIt

    from ...codegen.docs import page_name, render

    try:
        text = render([mode])[page_name(mode)]
    except Exception as exc:   # a registered extension the generator cannot describe
        return f"<p>No generated documentation for this mode ({_escape(str(exc))}).</p>"
    text = "\n".join(line for line in text.splitlines() if not line.startswith("<!--"))
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_fence = md.renderer.rules.get("fence")

    def fence(renderer, tokens, idx, options, env):
        if tokens[idx].info.strip() == "mermaid":
            return f'<figure class="diagram">{diagram_svg}</figure>\n'
        return default_fence(tokens, idx, options, env)

    md.add_render_rule("fence", fence)
    return md.render(text)


def _escape(text: str) -> str:
    import html

    return html.escape(text)
