"""YAML from people we do not control (prompts files), parsed with bounded work and one-line errors.

`yaml.safe_load` alone is not enough for that: aliases let a few hundred bytes expand into a
structure that every later walk (pydantic validation) visits an exponential number of times
("billion laughs", also through `<<` merge keys), and the pure-Python loader recurses once per
nesting level until RecursionError. So the document is composed first (libyaml's C composer
when present), its node graph is checked without recursion (nesting depth, no node reached
twice, i.e. no aliases), and only then constructed into Python objects.
"""
from __future__ import annotations

from typing import Any

import yaml

from masklet.actors.messages import MessageError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, max_depth: int, *, what: str = "YAML document") -> Any:
    """Parse one YAML document; raises MessageError (one line) for bad YAML, aliases, or deep nesting."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except RecursionError:
        raise MessageError(f"{what} is nested deeper than {max_depth} levels") from None
    except yaml.YAMLError as exc:
        raise MessageError(f"{what}: invalid YAML{_where(exc)}: {_problem(exc)}") from None
    if node is None:
        return None
    check_node_graph(node, max_depth, what)
    try:
        return _Loader("").construct_document(node)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise MessageError(f"{what}: invalid YAML{_where(exc)}: {_problem(exc)}") from None


def check_node_graph(root: yaml.Node, max_depth: int, what: str) -> None:
    """Nesting depth at most `max_depth`, and every collection node reached once (no aliases)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            continue
        if id(node) in seen:
            line = node.start_mark.line + 1 if node.start_mark is not None else "?"
            raise MessageError(f"{what}: YAML aliases (*name) are not allowed (line {line})")
        seen.add(id(node))
        depth += 1
        if depth > max_depth:
            raise MessageError(f"{what} is nested deeper than {max_depth} levels")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth) for child in node.value)
        else:  # MappingNode: (key, value) pairs
            stack.extend((part, depth) for pair in node.value for part in pair)


def _where(exc: BaseException) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


def _problem(exc: BaseException) -> str:
    text = getattr(exc, "problem", None) or str(exc)
    return " ".join(str(text).split())[:300]
