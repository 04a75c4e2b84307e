"""Workload file -> WorkloadSpec: the only place that reads workload YAML.

Steps: safe-load each file (recording where every key came from), resolve `extends`
chains with deep merges, apply `--set` overrides, then validate once with pydantic.
Every failure becomes a `SpecError` whose problems name the file, the YAML line, the
dotted field, what was wrong and what is allowed.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from orchestrator.bounded_yaml import MAX_FILE_BYTES, YAMLLimitError, parse
from orchestrator.spec import SpecFieldError, WorkloadSpec

__all__ = ["Problem", "SpecError", "load_workload", "parse_override"]

Key = tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workload, located as precisely as we can."""

    source: str  # a file path, or "--set a.b=c"
    path: str  # dotted field path; "" for the whole file
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """A workload could not be loaded; `problems` lists every reason found."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# Where each key path was last set: (file or --set text, 1-based line or None).
Sources = dict[Key, tuple[str, int | None]]


def load_workload(path: str | Path, overrides: Iterable[str] = ()) -> WorkloadSpec:
    """Load, merge, override and validate one workload file."""
    path = Path(path)
    data, sources = _resolve(path, ())
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value, item)
        sources[keys] = (f"--set {item}", None)
    try:
        return WorkloadSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(exc, sources, str(path))) from None


def parse_override(item: str) -> tuple[Key, Any]:
    """Split `a.b.c=value`; the value is parsed as a YAML scalar (`3e-4`, `false`, `[1, 2]`)."""
    key, sep, raw = item.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(k.strip() for k in keys):
        raise SpecError(
            [Problem(f"--set {item}", "", "expected dotted.key=value, e.g. train.max_steps=100")]
        )
    try:
        value = parse(raw)[0] if raw.strip() else ""
    except YAMLLimitError as exc:
        raise SpecError([Problem(f"--set {item}", key, f"value {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError(
            [Problem(f"--set {item}", key, f"value is not valid YAML: {exc}")]
        ) from None
    return tuple(k.strip() for k in keys), value


def _apply_override(data: dict[str, Any], keys: Key, value: Any, item: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if child is None:  # an explicit `section: null` in the file
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            raise SpecError(
                [
                    Problem(
                        f"--set {item}",
                        ".".join(keys),
                        f"cannot set inside {where}: it is a {type(child).__name__}, not a mapping",
                    )
                ]
            )
        node = child
    node[keys[-1]] = value


# --------------------------------------------------------------------------- files
def _resolve(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Sources]:
    """Read `path` and everything it extends, parents first, merged deeply."""
    data, sources = _read(path)
    parents = data.pop("extends", None)
    extends_line = sources.pop(("extends",), (str(path), None))[1]
    if parents is None:
        return data, sources
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise SpecError(
            [
                Problem(
                    str(path),
                    "extends",
                    "must be a file name or a list of file names",
                    extends_line,
                )
            ]
        )
    merged: dict[str, Any] = {}
    merged_sources: Sources = {}
    here = (*chain, path.resolve())
    for name in parents:
        parent = (path.parent / name).resolve()
        if parent in here:
            cycle = " -> ".join(p.name for p in here[here.index(parent) :]) + f" -> {parent.name}"
            raise SpecError([Problem(str(path), "extends", f"cycle: {cycle}", extends_line)])
        if not parent.is_file():
            what = "is not a file" if parent.exists() else "does not exist"
            raise SpecError(
                [Problem(str(path), "extends", f"parent {name} {what} ({parent})", extends_line)]
            )
        pdata, psources = _resolve(parent, here)
        _merge(merged, pdata)
        merged_sources.update(psources)  # key paths are absolute, so later files simply win
    _merge(merged, data)
    merged_sources.update(sources)
    return merged, merged_sources


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    """Deep-merge `over` into `base`: mappings merge, everything else replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _read(path: Path) -> tuple[dict[str, Any], Sources]:
    src = str(path)
    if not path.exists():
        raise SpecError([Problem(src, "", "no such file")])
    if path.is_dir():
        raise SpecError([Problem(src, "", "is a directory; give a workload .yaml file")])
    try:
        with path.open("rb") as file:  # a bounded read: the path may be /dev/zero or a FIFO
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError([Problem(src, "", f"cannot be read: {exc.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        limit = f"{MAX_FILE_BYTES >> 20} MiB"
        raise SpecError(
            [Problem(src, "", f"is over {limit}; a workload file may be {limit} at most")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(
            [Problem(src, "", "is not UTF-8 text; is it really a YAML file?")]
        ) from None
    try:
        data, node = parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        if not isinstance(exc, YAMLLimitError):
            problem = f"invalid YAML: {problem}"
        raise SpecError([Problem(src, "", problem, line)]) from None
    if data is None:
        raise SpecError(
            [Problem(src, "", "is empty; a workload needs at least name, model and data")]
        )
    if not isinstance(data, dict):
        raise SpecError(
            [
                Problem(
                    src,
                    "",
                    f"the top level must be a mapping of sections (name, model, data, ...), "
                    f"not a {_yaml_type(data)}",
                    1,
                )
            ]
        )
    sources: Sources = {}
    problems: list[Problem] = []
    assert node is not None  # a document whose data is a mapping has a node
    _index(node, (), src, sources, problems)
    if problems:
        raise SpecError(problems)
    return data, sources


def _index(node: yaml.Node, prefix: Key, src: str, out: Sources, problems: list[Problem]) -> None:
    """Record the line of every mapping key; flag duplicate keys, which YAML silently drops."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for knode, vnode in node.value:
        key = str(knode.value)
        if key == "<<":  # YAML merge key: its content is already in the loaded data
            continue
        if key in seen:
            problems.append(
                Problem(src, ".".join((*prefix, key)), "duplicate key", knode.start_mark.line + 1)
            )
        seen.add(key)
        out[(*prefix, key)] = (src, knode.start_mark.line + 1)
        _index(vnode, (*prefix, key), src, out, problems)


def _yaml_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------- errors
def _problems(exc: ValidationError, sources: Sources, top: str) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        base, models = _locate(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecFieldError):
            for rel, message in cause.problems:
                problems.append(_at(base + rel, message, sources, top))
            continue
        problems.append(_at(*_describe(err, base, models), sources, top))
    # Files first in line order, then --set overrides, so the list reads like the file.
    return sorted(problems, key=lambda p: (p.source.startswith("--set"), p.source, p.line or 0))


def _at(path: Key, message: str, sources: Sources, top: str) -> Problem:
    """Attribute a problem to where its field (or the nearest enclosing key) was written."""
    for n in range(len(path), 0, -1):
        if path[:n] in sources:
            src, line = sources[path[:n]]
            return Problem(src, ".".join(path), message, line)
    # A --set of a.b.c.d can fail at a.b.c (e.g. a dotted tune.space key): blame the --set.
    inner = [where for key, where in sources.items() if key[: len(path)] == path]
    src, line = inner[0] if inner else (top, None)
    return Problem(src, ".".join(path), message, line)


def _describe(err: ErrorDetails, path: Key, models: list[type[BaseModel]]) -> tuple[Key, str]:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = _locate(err["loc"][:-1])[1]
        allowed = sorted({f for m in parent for f in m.model_fields})
        return path, _unknown(path[-1], allowed)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(t for t in map(_tag, models) if t)
        if kind == "union_tag_not_found":
            return (*path, "kind"), f"missing; choose one of {tags}"
        got = err["ctx"]["tag"]
        return (*path, "kind"), f"unknown kind {got!r}; allowed: {tags}"
    if kind == "missing":
        return path, "required field is missing"
    message = err["msg"]
    if kind == "value_error":  # our own validators' messages already say what was given
        return path, message.removeprefix("Value error, ")
    if isinstance(value, (str, int, float, bool)) or value is None:
        message += f" (got {value!r})"
    elif isinstance(value, (list, dict)):
        message += f" (got a {_yaml_type(value)})"
    return path, message


def _unknown(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown field; did you mean {close[0]}?"
    return f"unknown field; allowed: {', '.join(allowed)}"


def _locate(loc: tuple[int | str, ...]) -> tuple[Key, list[type[BaseModel]]]:
    """Turn a pydantic error location into a dotted path and the models found there.

    pydantic puts discriminator tags (e.g. 'bert_mlm') into locations; they are not
    keys the user wrote, so they are dropped from the path.
    """
    path: list[str] = []
    annotation: Any = WorkloadSpec
    models: list[type[BaseModel]] = [WorkloadSpec]
    for part in loc:
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if isinstance(part, str) and field is not None:
            path.append(part)
            annotation = field.annotation
            models = _models_in(annotation)
            continue
        tagged = [m for m in models if _tag(m) == part]
        if tagged:
            models = tagged
            continue
        path.append(str(part))
        annotation = _item_type(annotation)
        models = _models_in(annotation)
    return tuple(path), models


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _item_type(annotation: Any) -> Any:
    """The type of a dict value or list item inside a (possibly optional) annotation."""
    for arg in (annotation, *typing.get_args(annotation)):
        origin = typing.get_origin(arg)
        if origin is dict:
            return typing.get_args(arg)[1]
        if origin in (list, tuple):
            return typing.get_args(arg)[0]
    return None


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if len(args) == 1 else None
