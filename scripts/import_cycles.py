"""No import cycles in the package (issue 13): every strongly connected group of modules in macp_runtime's
import graph, with one cycle through it, is a failure unless it is allowlisted below.

Run by scripts/lint with the lint environment's Python (grimp, import-linter's graph library, is installed
there; the strict editable install makes `macp_runtime` importable as the tools see it). Imports under
`if TYPE_CHECKING:` do not count (they are not executed); call-time imports inside functions do.

    .venv-lint/bin/python scripts/import_cycles.py
"""
from __future__ import annotations

import collections
import sys

import grimp

PACKAGE = "macp_runtime"

# Known cycles that other work removes, each as the set of its modules. A listed cycle that no longer
# exists is reported (not fatal): drop its entry then.
ALLOWED: list[frozenset[str]] = []


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of modules that import each other, largest first."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))
    return sorted(groups, key=len, reverse=True)


def one_cycle(graph, group: list[str]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group."""
    members = set(group)
    start = group[0]
    parent: dict[str, str] = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.find_modules_directly_imported_by(node) & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return group


def main() -> int:
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)
    groups = strongly_connected(graph)
    found = {frozenset(g) for g in groups}
    status = 0
    for group in groups:
        if frozenset(group) in ALLOWED:
            continue
        status = 1
        print(f"import cycle among {len(group)} modules: {', '.join(group)}")
        print("  for example: " + " -> ".join(one_cycle(graph, group)))
    for allowed in ALLOWED:
        if allowed not in found:
            print(f"note: the allowlisted cycle {', '.join(sorted(allowed))} is gone; drop it from "
                  f"scripts/import_cycles.py", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
