"""YAML text -> Python values, refusing documents no workload needs: huge, too deep, or looping.

A 1 KB file of nested aliases ("billion laughs") expands to billions of values; a `&a [*a]`
alias loops forever. Both are measured on the composed node graph, where an alias is one shared
node, so nothing is expanded before it has been counted.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "YAMLLimitError", "parse"]

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000  # values after alias expansion: mappings, lists, keys and scalars
MAX_DEPTH = 64  # levels of nesting after alias expansion


_TOO_MANY = (
    f"holds more than {MAX_NODES:,} values, counting what its *aliases repeat; "
    f"a workload may hold at most {MAX_NODES:,}"
)
_TOO_DEEP = (
    f"nests deeper than {MAX_DEPTH} levels, counting what its *aliases repeat; "
    f"a workload may nest at most {MAX_DEPTH}"
)


class YAMLLimitError(yaml.MarkedYAMLError):
    """The document is valid YAML, but larger, deeper or more circular than a workload may be."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float (YAML 1.1 insists on `3.0e-4`), and stops
    composing once the text alone holds too many or too deeply nested values."""

    def __init__(self, text: str):
        super().__init__(text)
        self._composed = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._composed += 1
        if self._composed > MAX_NODES:
            raise YAMLLimitError(_TOO_MANY, self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:  # also keeps the recursive composer off Python's limit
            raise YAMLLimitError(_TOO_DEEP, self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse(text: str) -> tuple[Any, yaml.Node | None]:
    """The document's value and its node graph (for line numbers); None, None when empty.

    Raises yaml.YAMLError: invalid YAML, or a YAMLLimitError past the limits above.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _measure(node)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def _measure(root: yaml.Node) -> None:
    """Count the values and levels `root` expands to, each shared node once (iteratively, as an
    alias chain can be longer than Python's recursion limit); refuse a node that contains itself."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth)
    open_: set[int] = set()  # the nodes on the path from the root: reaching one again loops
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            size = 1 + sum(measured[id(c)][0] for c in children)
            depth = 1 + max((measured[id(c)][1] for c in children), default=0)
            if size > MAX_NODES:
                raise YAMLLimitError(_TOO_MANY, node.start_mark)
            if depth > MAX_DEPTH:
                raise YAMLLimitError(_TOO_DEEP, node.start_mark)
            measured[id(node)] = (size, depth)
            open_.discard(id(node))
            continue
        if id(node) in measured:
            continue
        if id(node) in open_:
            raise YAMLLimitError(
                "an *alias refers to a value that contains it, so the value never ends; "
                "aliases must not loop",
                node.start_mark,
            )
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
