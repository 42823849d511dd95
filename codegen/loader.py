"""YAML -> plain dicts that remember the line of every key (for error messages)."""
from __future__ import annotations

from typing import Any

import yaml

from .errors import SpecError


class LineDict(dict):
    """A dict that also knows the 1-based source line of each of its keys."""

    __slots__ = ("lines", "line", "source")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}
        self.line: int | None = None
        self.source: str | None = None   # the YAML text, on the top-level mapping only


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (list, dict)):   # `[]: 1` or `{a: 1}: 2` — YAML allows it, a spec never means it
            raise SpecError(loader.name, "", "a mapping key must be a name, not a list or mapping",
                            key_node.start_mark.line + 1)
        if key in result:
            raise SpecError(loader.name, str(key), "duplicate key", key_node.start_mark.line + 1)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec_text(text: str, file: str = "<string>") -> LineDict:
    try:
        loader = _Loader(text)   # the reader rejects control characters here, before parsing
    except yaml.YAMLError as exc:
        raise SpecError(file, "", f"invalid YAML: {exc}") from None
    loader.name = file
    try:
        data = loader.get_single_data()
    except SpecError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(file, "", f"invalid YAML: {exc.problem or exc}", line) from None
    except yaml.YAMLError as exc:
        raise SpecError(file, "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, LineDict):
        raise SpecError(file, "", "a mode spec must be a YAML mapping at the top level", 1)
    data.source = text
    return data


def load_spec_file(path: str) -> LineDict:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SpecError(path, "", f"cannot read file: {exc.strerror}") from None
    return load_spec_text(text, path)
