"""The one rule for workload, run and sweep names, which become directories, Ray job ids
(`orch-{name}-{hex}`) and MLflow run names."""

from __future__ import annotations

import re

__all__ = ["MAX_NAME_LENGTH", "NAME_PATTERN", "NAME_RULE", "derived_name", "name_problem"]

MAX_NAME_LENGTH = 128
# Never `.`, `..` or a path separator, so `storage_path/{name}` stays inside storage_path.
NAME_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
NAME_RULE = (
    f"up to {MAX_NAME_LENGTH} letters, digits, '-', '_' and single '.', "
    "starting with a letter or digit"
)


def name_problem(name: str) -> str | None:
    """What makes `name` unusable as a name, worded for an error message; None if it is fine."""
    if len(name) > MAX_NAME_LENGTH or not re.fullmatch(NAME_PATTERN, name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        return f"{shown!r} is not a valid name; use {NAME_RULE}"
    return None


def derived_name(name: str, suffix: str) -> str:
    """`name` + `suffix` (e.g. a sweep's `-best` workload), `name` cut so the result still fits."""
    return name[: MAX_NAME_LENGTH - len(suffix)] + suffix
