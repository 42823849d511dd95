"""The option machinery: one declaration per setting drives its environment variable, its `serve` flag,
its `--help` line and its row in the README's tables.

A setting is a field of a dataclass (`config.Config`) declared with `option(...)`: the field's name,
type and default are the dataclass's; the option adds the variable, the flag, the kind of value (how
a string is parsed and what a bad one is told) and the help text (Markdown; `--help` shows it plain).
Everything else reads the declarations:

* `read(cls, environ, flags)`: the variables, then the flags (a flag wins over its variable); every
  problem is collected, each naming the variable (and the flag when the value came from one).
* `add_flags(parser, cls)`: the argparse flags, each storing the raw value under the field's name.
* `markdown(cls, section)`: the README table of one section.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import textwrap
from collections.abc import Callable
from typing import Any

# --- kinds of values -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """How a raw string becomes a value, and how a flag of this kind is given."""

    convert: Callable[[str], Any]          # raises ValueError for an unusable string
    phrase: str = ""                       # "NAME must be PHRASE, got RAW"
    message: Callable[[str, str], str] | None = None   # (name, raw) -> the whole problem, instead of phrase
    flag: str = "value"      # "value": takes a string; "switch": no value, stores `const`; "bool": --x/--no-x;
    const: Any = None        # "append": repeatable, the list is the value
    env_value: str = ""      # what a switch's variable is set to (`MACP_MEMORY_ONLY=1`)
    choices: tuple[str, ...] | None = None
    lenient_env: bool = False   # an unusable variable falls back to the default with a warning (as the reference)

    def problem(self, name: str, raw: str) -> str:
        if self.message is not None:
            return self.message(name, raw)
        return f"{name} must be {self.phrase}, got {raw!r}"


def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def convert(raw: str):
        value = cast(raw)
        if not ok(value):
            raise ValueError(raw)
        return value
    return convert


def _one_of(values: tuple[str, ...], fold: bool = False) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.lower() if fold else raw
        if value not in values:
            raise ValueError(raw)
        return value
    return convert


def _existing_file(raw: str) -> str:
    if raw and not os.path.isfile(raw):
        raise ValueError(raw)
    return raw


def _not_empty(raw: str) -> str:
    if not raw:
        raise ValueError(raw)
    return raw


def _finite(value: float) -> bool:
    return value < float("inf")


TEXT = Kind(str)
SWITCH = Kind(lambda raw: raw == "1", flag="switch", const=True, env_value="1")   # any other value: off
BOOL01 = Kind(lambda raw: _one_of(("0", "1"))(raw) == "1", "0 or 1", flag="bool")
POSITIVE = Kind(_number(int, lambda v: v > 0), "a positive integer")
COUNT = Kind(_number(int, lambda v: v >= 0), "0 or a positive integer")
RATIO = Kind(_number(float, lambda v: 0 <= v <= 1), "a number from 0 to 1")
SECONDS_OR_0 = Kind(_number(float, lambda v: 0 <= v and _finite(v)), "0 or a positive number of seconds")
SECONDS = Kind(_number(float, lambda v: 0 < v and _finite(v)), "a positive number of seconds", lenient_env=True)
PATHS = Kind(lambda raw: [p for p in raw.split(os.pathsep) if p], flag="append")
FILE = Kind(_existing_file, message=lambda name, raw: f"{name} points to {raw!r}, which does not exist")
NOT_EMPTY = Kind(_not_empty, message=lambda name, raw: f"{name} must not be empty")


def choice(*values: str, message: Callable[[str, str], str] | None = None, fold: bool = False) -> Kind:
    return Kind(_one_of(values, fold), "one of " + ", ".join(values), message=message, choices=values)


def address(example: str, optional: bool = False) -> Kind:
    """An IP literal and a port (`[::1]:50051` for IPv6); `optional`: the empty string means off."""
    def convert(raw: str) -> str:
        if (raw or not optional) and parse_bind_addr(raw) is None:
            raise ValueError(raw)
        return raw
    return Kind(convert, f"an IP address and port such as {example}")


def parse_bind_addr(addr: str) -> tuple[str, int] | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    version = 4
    if host.startswith("[") and host.endswith("]"):
        host, version = host[1:-1], 6
    try:
        if ipaddress.ip_address(host).version != version:
            return None
    except ValueError:
        return None
    return host, int(port)


def is_loopback(addr: str) -> bool:
    parsed = parse_bind_addr(addr)
    return parsed is not None and ipaddress.ip_address(parsed[0]).is_loopback


# --- declarations --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    env: str
    kind: Kind
    help: str                          # Markdown: the README's Meaning, and (plain) the flag's --help
    flag: str | None = None            # None: environment only
    metavar: str | None = None
    default_doc: str | None = None     # the Default column when the value alone would mislead (Markdown)
    section: str = "serve"             # which README table
    secret: bool = False               # never logged, never a flag
    field: str = ""                    # filled in from the dataclass
    default: Any = None


def option(env: str, kind: Kind, default: Any, help: str, **more: Any) -> Any:
    """A dataclass field declared as a setting (see the module text)."""
    spec = Option(env, kind, " ".join(help.split()), **more)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"option": spec})
    return dataclasses.field(default=default, metadata={"option": spec})


@functools.cache
def declared(cls) -> tuple[Option, ...]:
    """The declared settings of `cls`, in declaration order, each with its field and default."""
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            out.append(dataclasses.replace(spec, field=f.name, default=default))
    return tuple(out)


# --- reading -------------------------------------------------------------------------------------------


def read(cls, environ, flags: dict[str, Any] | None = None) -> tuple[Any, list[str], list[str]]:
    """(an instance of `cls`, problems, warnings) from the variables and the flags' raw values (a flag wins)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    warnings: list[str] = []
    flags = flags or {}
    for opt in declared(cls):
        kind = opt.kind
        if opt.env in environ:
            raw = environ[opt.env]
            try:
                values[opt.field] = kind.convert(raw)
            except ValueError:
                if kind.lenient_env:
                    warnings.append(f"{opt.env}={raw!r} is not {kind.phrase}; using the default {_text(opt.default)}")
                else:
                    problems.append(kind.problem(opt.env, raw))
        given = flags.get(opt.field)
        if given is None or opt.flag is None:
            continue
        if kind.flag != "value":        # switches, --x/--no-x and repeated flags arrive as values already
            values[opt.field] = given
            continue
        try:
            values[opt.field] = kind.convert(given)
        except ValueError:
            problems.append(f"{kind.problem(opt.env, given)} (given as {opt.flag})")
    return cls(**values), problems, warnings


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- flags and --help ----------------------------------------------------------------------------------


_CODE = re.compile(r"(`[^`]*`)")
_EMPHASIS = re.compile(r"(?<!\w)\*(\w[^*]*?)\*(?!\w)")


def plain(markdown: str) -> str:
    """Help text for a terminal: no Markdown emphasis or code marks (code kept as written); `%` kept
    literal for argparse."""
    parts = []
    for part in _CODE.split(markdown):
        if len(part) >= 2 and part[0] == part[-1] == "`":
            parts.append(part[1:-1])
        else:
            parts.append(_EMPHASIS.sub(r"\1", part.replace("**", "")))
    return "".join(parts).replace("%", "%%")


def _variable(opt: Option) -> str:
    return f"{opt.env}={opt.kind.env_value}" if opt.kind.env_value else opt.env


def _default_doc(opt: Option) -> str | None:
    """The default as Markdown, or None when there is none worth saying (unset, off)."""
    if opt.default_doc is not None:
        return opt.default_doc
    if opt.default is None or opt.default is False or opt.default in ("", []):
        return None
    return f"`{_text(opt.default)}`"


def add_flags(parser, cls, only: tuple[str, ...] = ()) -> None:
    """The flags of `cls`'s settings (or of the fields `only`); each stores its raw value (None when absent)
    under the field's name."""
    import argparse

    for opt in declared(cls):
        if opt.flag is None or (only and opt.field not in only):
            continue
        default = _default_doc(opt)
        where = _variable(opt) + (f", default {plain(default)}" if default else "")
        kwargs: dict[str, Any] = {"dest": opt.field, "default": None, "help": f"{plain(opt.help)} ({where})"}
        if opt.kind.flag == "switch":
            kwargs.update(action="store_const", const=opt.kind.const)
        elif opt.kind.flag == "bool":
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif opt.kind.flag == "append":
            kwargs.update(action="append", metavar=opt.metavar)
        else:
            kwargs.update(metavar=opt.metavar, choices=opt.kind.choices)
        parser.add_argument(opt.flag, **kwargs)


def environment_only(cls, width: int = 100) -> str:
    """The settings without a flag, as --help epilog lines."""
    lines = []
    for opt in declared(cls):
        if opt.flag is None:
            default = _default_doc(opt)
            text = plain(opt.help).replace("%%", "%") + (f" (default {plain(default)})" if default else "")
            lines.append(f"  {opt.env}")
            lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


# --- the README tables ---------------------------------------------------------------------------------

MARK_BEGIN = "<!-- options:{section} (generated from the option table by scripts/readme-options; do not edit) -->"
MARK_END = "<!-- end of options:{section} -->"


def _flag_cell(opt: Option) -> str:
    if opt.flag is None:
        return "— (environment only)" if opt.secret else "—"
    if opt.kind.flag == "bool":
        return f"`{opt.flag}` / `--no-{opt.flag[2:]}`"
    return f"`{opt.flag}`"


def markdown(cls, section: str) -> str:
    """The README table of one section, between its markers."""
    rows = [o for o in declared(cls) if o.section == section]
    with_flags = any(o.flag for o in rows)
    head = ["Variable"] + (["Flag"] if with_flags else []) + ["Default", "Meaning"]
    lines = [MARK_BEGIN.format(section=section), "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in rows:
        cells = [f"`{_variable(o)}`"] + ([_flag_cell(o)] if with_flags else []) + [_default_doc(o) or "unset", o.help]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(MARK_END.format(section=section))
    return "\n".join(lines)


def sections(cls) -> list[str]:
    return list(dict.fromkeys(o.section for o in declared(cls)))
