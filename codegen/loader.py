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


MAX_DEPTH = 64                 # nesting of mappings and lists in a spec, aliases expanded
MAX_EXPANDED_NODES = 100_000   # values in a spec with every alias expanded


class _Loader(yaml.SafeLoader):
    """SafeLoader with bounds: nesting depth, and the size the document has once its aliases are
    expanded (a few hundred bytes of nested aliases expand to gigabytes). Both are checked on the
    composed node graph before anything is constructed, in time linear in the document."""

    _depth = 0

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(self.name, node)
        return node

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError(self.name, "", f"the spec is nested more than {MAX_DEPTH} levels deep", mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(name: str, root) -> None:
    """Expanded size and depth of the node graph, memoised per node (an alias is the same node object)."""
    memo: dict[int, tuple[int, int]] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in memo:
            continue
        if isinstance(node, yaml.ScalarNode):
            memo[key] = (1, 1)
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value))
        if not children_done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in memo)
            continue
        size = 1 + sum(memo[id(c)][0] for c in children)
        depth = 1 + max((memo[id(c)][1] for c in children), default=0)
        if size > MAX_EXPANDED_NODES:
            raise SpecError(name, "", f"the spec expands to more than {MAX_EXPANDED_NODES} values "
                                      f"(aliases counted as often as they are used)", node.start_mark.line + 1)
        if depth > MAX_DEPTH:
            raise SpecError(name, "", f"the spec is nested more than {MAX_DEPTH} levels deep (aliases expanded)",
                            node.start_mark.line + 1)
        memo[key] = (size, depth)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise SpecError(loader.name, "", f"a mapping key must be a plain value, not a {type(key).__name__}",
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
    except RecursionError:
        raise SpecError(file, "", "the spec is nested too deeply") from None
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
