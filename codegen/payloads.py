"""How a message type's payload bytes become the object hooks see: a protobuf message of the installed
`macp` packages, `json` (optionally with described, type-checked fields), `opaque` bytes, or a
decode hook."""
from __future__ import annotations

import importlib
import json
import pkgutil
from typing import Any, Callable

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..specs.hooks.context import Reject
from .hooks import HookResolver
from .model import PayloadBinding
from .nodes import Ctx, unknown_keys


def _proto_pool():
    import macp

    for info in pkgutil.walk_packages(macp.__path__, "macp."):
        if info.name.endswith("_pb2"):
            importlib.import_module(info.name)
    return descriptor_pool.Default()


_POOL = None


def message_class(full_name: str):
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


def payload_bindings(ctx: Ctx, hooks: HookResolver, spec: dict) -> dict[str, PayloadBinding]:
    """The spec's `payloads` section: message type -> how its bytes are decoded."""
    payload_node = spec.get("payloads", {}) or {}
    if not isinstance(payload_node, dict):
        raise ctx.fail(spec, "payloads", "must be a mapping of message type to payload message", "payloads")
    payloads: dict[str, PayloadBinding] = {}
    for msg, ref in payload_node.items():
        path = f"payloads.{msg}"
        if isinstance(ref, dict) and "decode" not in ref:
            unknown_keys(ctx, ref, {"type", "description", "fields"}, path)
            kind = ref.get("type")
            if kind not in BUILTIN_PAYLOADS and (not isinstance(kind, str) or message_class(kind) is None):
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
                unknown_keys(ctx, fdesc, {"type", "description", "required"}, f"{path}.fields.{fname}")
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
                payloads[msg] = PayloadBinding(msg, kind, _proto_decoder(message_class(kind)))
        elif isinstance(ref, dict):
            unknown_keys(ctx, ref, {"decode"}, path)
            fn = hooks.get(ref, f"{path}.decode", ref.get("decode"), "decode")
            payloads[msg] = PayloadBinding(msg, f"hook:{ref.get('decode')}", fn)
        elif isinstance(ref, str) and ref in BUILTIN_PAYLOADS:
            payloads[msg] = PayloadBinding(msg, ref, BUILTIN_PAYLOADS[ref])
        elif isinstance(ref, str):
            cls = message_class(ref)
            if cls is None:
                raise ctx.fail(payload_node, path, f"unknown protobuf message {ref!r}", msg)
            payloads[msg] = PayloadBinding(msg, ref, _proto_decoder(cls))
        else:
            raise ctx.fail(payload_node, path, "must be a protobuf message name, json, opaque or {decode: hook}", msg)
    return payloads
