"""The mode registry: compiled modes by name, the listings the discovery RPCs return, and the
extension registry behind RegisterExtMode / UnregisterExtMode / PromoteMode (modes.md §9).

Modes compiled from spec files at start-up are *built-in*: they cannot be unregistered. A registered
extension is compiled from its descriptor alone (a passthrough mode, modes.md §8) or, when the
descriptor carries a whole YAML mode spec under `schema_uris["macp-runtime/spec-yaml"]`, from that
spec (phases, senders, guards and commit condition enforced by its compiled machine).

Every change is written to the document store (document "modes") before it takes effect, so the
registry a restarted server loads before replaying sessions is the one its sessions ran under.
Every successful change is announced on `changes` (WatchModeRegistry, capacity 16).
"""
from __future__ import annotations

import copy
import logging
import os
import re
import threading

from google.protobuf import json_format
from macp.v1 import core_pb2

from ..codegen import CompiledMode, SpecError, compile_spec, load_modes, load_spec_text
from ..specs import SPECS_DIR
from ..specs.hooks.common import is_blank
from ..vocabulary.broadcast import Broadcaster
from ..vocabulary.session import now_ms
from .documents import shared_change

log = logging.getLogger("macp_runtime.modes")

#: The descriptor key whose value is the YAML text of a full mode spec (this runtime's convention).
SPEC_YAML_KEY = "macp-runtime/spec-yaml"
#: The file name compiler errors of a registered spec refer to (`<spec-yaml>:12: transitions[0]...`).
SPEC_LABEL = "<spec-yaml>"
MAX_SPEC_BYTES = 256 * 1024
MAX_MODE_NAME = 256            # characters of a registered or promoted mode name
DOCUMENT = "modes"
WATCH_CAPACITY = 16
PROMOTED_POSITION = 1_000_000   # promoted modes list after the five standard ones, by name
_HOOK_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _is_builtin_file(path: str) -> bool:
    return os.path.abspath(path).startswith(os.path.join(SPECS_DIR, ""))


class ModeRegistry:
    def __init__(self, modes: list[CompiledMode]):
        self._lock = threading.RLock()
        self.commitment_only = False   # the current profile's RegisterExtMode/PromoteMode rules (§11.2)
        self._modes: dict[str, CompiledMode] = {}
        for mode in modes:
            # A later directory may override an earlier spec of the same mode name.
            replaced = self._modes.get(mode.name)
            if replaced is not None and not _is_builtin_file(mode.source):   # not the profile overlay
                log.warning("mode %s from %s overrides the spec from %s", mode.name, mode.source, replaced.source,
                            extra={"fields": {"mode": mode.name, "spec": mode.source, "overridden": replaced.source}})
            self._modes[mode.name] = mode
        # What makes a mode differ from the spec files: registry key -> persisted entry, one of
        #   {"name", "builtin": <spec-file mode name>, "standards_track": true}      (a promoted built-in)
        #   {"name", "kind": "passthrough", "descriptor": {...}, "standards_track": bool}
        #   {"name", "kind": "spec", "descriptor": {...}, "spec_yaml": "...", "standards_track": bool}
        self._entries: dict[str, dict] = {}
        self._documents = None
        self._builtin = dict(self._modes)             # the spec files' modes, before any entry applies
        self.changes = Broadcaster(WATCH_CAPACITY)   # items: observed_at_unix_ms of the change
        self._refresh()

    @classmethod
    def from_spec_dirs(cls, extra_dirs: list[str] | None = None, profile=None) -> "ModeRegistry":
        """The built-in specs, the profile's overlay (specs/current/ replaces the v0.4.0 rules of the
        same modes under `current`), then the extra directories."""
        overlay = profile.spec_dirs() if profile is not None else []
        registry = cls(load_modes(overlay + list(extra_dirs or [])))
        registry.commitment_only = bool(profile is not None and profile.ext_mode_commitment_only)
        return registry

    def _refresh(self) -> None:
        modes = list(self._modes.values())
        self.names = sorted(self._modes)
        self.standard = [m.descriptor for m in sorted(
            (m for m in modes if m.standards_track), key=lambda m: (m.list_position, m.name))]
        self.extensions = [m.descriptor for m in sorted(
            (m for m in modes if not m.standards_track), key=lambda m: m.name)]
        self.public_extensions = [_without_spec_text(d) for d in self.extensions]

    def get(self, name: str) -> CompiledMode | None:
        return self._modes.get(name)

    # --- persistence -------------------------------------------------------------------------------

    def attach_documents(self, documents) -> int:
        """Load the registered/promoted modes saved by earlier runs and save future changes there.

        Call before replaying sessions. Returns how many entries were restored; an entry that no
        longer compiles is logged and skipped (its sessions then fail to recover). Raises
        StorageError when the document cannot be read.
        """
        doc = documents.load(DOCUMENT)
        restored = 0
        with self._lock:
            self._documents = documents
            for entry in (doc or {}).get("modes", []):
                try:
                    self._restore(entry)
                    restored += 1
                except Exception as exc:  # one bad entry must not keep the others (or the server) down
                    log.warning("registered mode %r could not be restored: %s", entry.get("name"), exc)
            self._refresh()
        return restored

    def _reload_locked(self) -> None:
        """Rebuild the registry from the spec files and the stored document (lock held)."""
        doc = self._documents.load(DOCUMENT)
        self._modes = dict(self._builtin)
        self._entries = {}
        for entry in (doc or {}).get("modes", []):
            try:
                self._restore(entry)
            except Exception as exc:
                log.warning("registered mode %r could not be restored: %s", entry.get("name"), exc)
        self._refresh()

    def _shared_change(self):
        return shared_change(self._documents, DOCUMENT, self._reload_locked)

    def reload(self) -> None:
        """Another instance changed the shared registry: read it again and tell the watchers."""
        with self._lock:
            before = dict(self._entries)
            self._reload_locked()
            changed = self._entries != before
        if changed:
            self._changed()

    def _restore(self, entry: dict) -> None:
        name = entry["name"]
        if "builtin" in entry:
            original = self._modes.pop(entry["builtin"])
            self._modes[name] = _promoted(original, name)
        else:
            if name in self._modes:
                raise ValueError("a built-in mode of that name exists now")
            descriptor = json_format.ParseDict(entry["descriptor"], core_pb2.ModeDescriptor())
            if entry["kind"] == "spec":
                compiled, error = _compile_yaml(name, descriptor, entry["spec_yaml"])
            else:
                compiled, error = _compile_passthrough(name, descriptor)
            if error is not None:
                raise ValueError(error)
            self._modes[name] = _promoted(compiled, name) if entry.get("standards_track") else compiled
        self._entries[name] = entry

    def _save(self, entries: dict[str, dict]) -> None:
        """Write the would-be state first; only then does the caller change memory (StorageError)."""
        if self._documents is None:
            return
        ordered = sorted(entries.values(), key=lambda e: ("builtin" not in e, e["name"]))
        self._documents.save(DOCUMENT, {"version": 1, "modes": ordered})

    # --- RegisterExtMode / UnregisterExtMode / PromoteMode (modes.md §9.3) --------------------------

    def register(self, descriptor: core_pb2.ModeDescriptor) -> str | None:
        """Register an extension. Returns the error text (modes.md §9.3, verbatim) or None."""
        name = descriptor.mode
        if is_blank(name):
            return "mode name must not be empty"
        if name.startswith("macp.mode."):
            return "cannot register extension with reserved macp.mode.* namespace"
        if not descriptor.message_types:
            return "extension descriptor must declare at least one message type"
        if is_blank(descriptor.mode_version):
            return "extension descriptor must bind mode_version"
        if self.commitment_only:   # current.md §11.2: every registered mode must be able to resolve
            if not descriptor.terminal_message_types:
                return "extension descriptor must declare at least one terminal message type"
            for t in descriptor.terminal_message_types:
                if t != "Commitment":
                    return (f"dynamically registered modes resolve only on 'Commitment'; terminal message type "
                            f"'{t}' would never terminate a session")
        for t in descriptor.terminal_message_types:
            if t not in descriptor.message_types:
                return f"terminal message type '{t}' must also appear in message_types"
        if len(name) > MAX_MODE_NAME:
            return f"mode name is longer than {MAX_MODE_NAME} characters"
        if name in self._modes:   # checked again under the lock; this only spares a compile
            return f"mode '{name}' is already registered"
        # Compiled before the registry's lock is taken: a large or slow spec holds up nobody else.
        spec_text = descriptor.schema_uris.get(SPEC_YAML_KEY)
        entry = {"name": name, "descriptor": json_format.MessageToDict(descriptor, preserving_proto_field_name=True),
                 "standards_track": False}
        if spec_text is not None:
            compiled, error = _compile_yaml(name, descriptor, spec_text)
            entry.update(kind="spec", spec_yaml=spec_text)
        else:
            compiled, error = _compile_passthrough(name, descriptor)
            entry["kind"] = "passthrough"
        if error is not None:
            return error
        with self._lock, self._shared_change():
            if name in self._modes:
                return f"mode '{name}' is already registered"
            self._save({**self._entries, name: entry})
            self._modes[name] = compiled
            self._entries[name] = entry
            self._refresh()
        log.info("mode %r registered (%s)", name, entry["kind"])
        self._changed()
        return None

    def unregister(self, name: str) -> str | None:
        with self._lock, self._shared_change():
            compiled = self._modes.get(name)
            if compiled is None:
                return f"mode '{name}' not found"
            entry = self._entries.get(name)
            if entry is None or "builtin" in entry:
                return f"cannot unregister built-in mode '{name}'"
            if compiled.standards_track:
                return f"cannot unregister standards-track mode '{name}'"
            rest = {k: v for k, v in self._entries.items() if k != name}
            self._save(rest)
            del self._modes[name]
            self._entries = rest
            self._refresh()
        log.info("mode %r unregistered", name)
        self._changed()
        return None

    def promote(self, name: str, new_name: str = "") -> tuple[str | None, str]:
        """Make a mode standards-track (and strict at SessionStart), optionally under a new name.
        Returns (error text or None, final name)."""
        with self._lock, self._shared_change():
            compiled = self._modes.get(name)
            if compiled is None:
                return f"mode '{name}' not found", ""
            if compiled.standards_track:
                return f"mode '{name}' is already standards-track", ""
            final = new_name if new_name and new_name != name else name
            # current profile (the default): never into the reserved namespace; the v0.4.0 profile keeps
            # the reference runtime's answer (tests/wire/test_profile_registry_wire.py)
            if self.commitment_only and final != name and final.startswith("macp.mode."):
                return f"cannot promote '{name}' into the reserved macp.mode.* namespace", ""
            if len(final) > MAX_MODE_NAME:
                return f"mode name is longer than {MAX_MODE_NAME} characters", ""
            if final != name and final in self._modes:
                return f"cannot promote: target name '{final}' already exists", ""
            entry = dict(self._entries.get(name) or {"builtin": name})
            entry["name"] = final
            entry["standards_track"] = True
            entries = {k: v for k, v in self._entries.items() if k != name}
            entries[final] = entry
            self._save(entries)
            del self._modes[name]
            self._modes[final] = _promoted(compiled, final)
            self._entries = entries
            self._refresh()
        log.info("mode %r promoted to standards-track as %r", name, final)
        self._changed()
        return None, final

    def _changed(self) -> None:
        self.changes.publish(now_ms())

    def close(self) -> None:
        self.changes.close()


def _without_spec_text(descriptor: core_pb2.ModeDescriptor) -> core_pb2.ModeDescriptor:
    """The descriptor as an unauthenticated caller may see it: without a registered spec's YAML."""
    if SPEC_YAML_KEY not in descriptor.schema_uris:
        return descriptor
    shown = core_pb2.ModeDescriptor()
    shown.CopyFrom(descriptor)
    del shown.schema_uris[SPEC_YAML_KEY]
    return shown


def _with_descriptor(compiled: CompiledMode, name: str, descriptor: core_pb2.ModeDescriptor) -> CompiledMode:
    shown = core_pb2.ModeDescriptor()
    shown.CopyFrom(descriptor)
    shown.mode = name   # a registered descriptor is listed as submitted, under its registry key
    compiled.descriptor = shown
    compiled.name = name
    compiled.standards_track = False
    return compiled


def _promoted(compiled: CompiledMode, name: str) -> CompiledMode:
    """A standards-track, strict-start copy under `name`; sessions of the original keep theirs."""
    promoted = copy.copy(compiled)
    descriptor = core_pb2.ModeDescriptor()
    descriptor.CopyFrom(compiled.descriptor)
    descriptor.mode = name
    promoted.name = name
    promoted.descriptor = descriptor
    promoted.standards_track = True
    promoted.strict_start = True
    if promoted.list_position < PROMOTED_POSITION:
        promoted.list_position = PROMOTED_POSITION
    return promoted


def _compile_passthrough(name: str, descriptor) -> tuple[CompiledMode | None, str | None]:
    try:
        from ..codegen.passthrough import compile_passthrough
    except ImportError:
        return None, "passthrough extensions are not available in this build"
    try:
        compiled = compile_passthrough(descriptor)
    except SpecError as exc:
        return None, str(exc)
    except Exception as exc:   # anything else a descriptor can provoke is a refusal, never UNKNOWN
        return None, f"the descriptor cannot be compiled: {type(exc).__name__}: {str(exc)[:200]}"
    compiled.strict_start = False
    return _with_descriptor(compiled, name, descriptor), None


def _compile_yaml(name: str, descriptor, text: str) -> tuple[CompiledMode | None, str | None]:
    """Compile a registered YAML spec; (None, the compiler's precise error) when it is not valid."""
    if len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        return None, f"{SPEC_LABEL}: the spec is larger than {MAX_SPEC_BYTES} bytes"
    try:
        spec = load_spec_text(text, SPEC_LABEL)
        hooks = spec.get("hooks") if isinstance(spec, dict) else None
        if hooks is not None and not (isinstance(hooks, str) and _HOOK_MODULE.match(hooks)):
            # A registered spec may use the runtime's hook modules, never load code from a path.
            line = spec.lines.get("hooks")
            where = f"{SPEC_LABEL}:{line}" if line else SPEC_LABEL
            return None, f"{where}: hooks: a registered spec may only name a hook module of the runtime, got {hooks!r}"
        compiled = compile_spec(spec, SPEC_LABEL, overrides={"mode": name})
    except SpecError as exc:
        return None, str(exc)
    except RecursionError:
        return None, f"{SPEC_LABEL}: the spec is nested too deeply"
    except Exception as exc:   # anything else a spec can provoke is a refusal, never UNKNOWN
        return None, f"{SPEC_LABEL}: the spec cannot be compiled: {type(exc).__name__}: {str(exc)[:200]}"
    if compiled.version != descriptor.mode_version:
        return None, (f"{SPEC_LABEL}: version: the spec's version '{compiled.version}' differs from the "
                      f"descriptor's mode_version '{descriptor.mode_version}'")
    return _with_descriptor(compiled, name, descriptor), None
