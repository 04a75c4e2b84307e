"""Masking secrets: the one rule for every text orch prints, logs, writes or sends to MLflow.

Three kinds of secret are masked wherever they appear in a text: the userinfo of a URI
(`scheme://user:password@host`, up to the last `@` before the host, so passwords with `@` or
`/` go whole), values of secret-looking names (`?token=...`, `X-Amz-Signature=...`,
`"AWS_SECRET_ACCESS_KEY": "..."`), and `Bearer`/`Basic` credentials. A workload's env var
values are masked whatever their names (`public_spec`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from orchestrator.spec import WorkloadSpec

__all__ = [
    "MASK",
    "first_line",
    "is_secret_name",
    "mask",
    "mask_env",
    "public_dump",
    "public_spec",
    "public_yaml",
    "secret_fields",
    "split_userinfo",
]

MASK = "***"

# A name is secret-looking when it contains one of these anywhere (case-insensitive)...
_SECRET_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "SIGNATURE")
# ...or has one of these as a whole word (words split at `_`, `-`, `.` and camelCase): as
# substrings they would catch KEYBOARD, MONKEY, TOKENIZERS_PARALLELISM or AUTHOR.
_SECRET_WORDS = frozenset(
    {
        "TOKEN",
        "KEY",
        "AUTH",
        "AUTHORIZATION",
        "PRIVATE",
        "SESSION",
        "PASS",
        "PWD",
        "SIG",
        "COOKIE",
        "APIKEY",
        "APITOKEN",
        "AUTHTOKEN",
        "ACCESSKEY",
        "ACCESSTOKEN",
        "SECRETKEY",
        "PRIVATEKEY",
    }
)

# A URI's authority and what follows, up to whitespace or a quote: the userinfo is found in it.
_URI = re.compile(r"""(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s"'<>`]+)""")
_HOST_START = re.compile(r"[A-Za-z0-9\[]")
# `name=value` (query strings, env assignments) or `"name": "value"` (JSON, dict reprs). Dotted
# names are left alone: in orch's texts they are spec fields (`--set dotted.key=value`).
_ASSIGNMENT = re.compile(
    r"""(?P<name>(?<![\w.-])[A-Za-z][\w-]*=|(?P<q>["'])[A-Za-z][\w-]*(?P=q)\s*:\s*["']?)"""
    r"""(?P<scheme>(?:Bearer|Basic|Token)\s+)?(?P<value>[^\s"'&#,;}\]]+)"""
)
# Case-sensitive and 8 characters at least, so that prose ("a bearer token") stays readable.
_BEARER = re.compile(r"\b(?P<scheme>Bearer|Basic)\s+(?P<value>[A-Za-z0-9._~+/=-]{8,})")
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z0-9]+(?![a-z])")

# Where a workload keeps the env vars of its job: every value masked, whatever its name.
_ENV_VARS = ("cluster", "runtime_env", "env_vars")


def is_secret_name(name: str) -> bool:
    """Whether a variable, parameter or field of this name holds a secret (see the lists above)."""
    upper = name.upper()
    if any(part in upper for part in _SECRET_PARTS):
        return True
    return any(word.upper() in _SECRET_WORDS for word in _WORD.findall(name))


def mask(text: str) -> str:
    """`text` with URI credentials, secret-looking `name=value`s and bearer tokens masked."""
    text = _URI.sub(_mask_uri, text)
    text = _BEARER.sub(lambda m: f"{m['scheme']} {MASK}", text)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def first_line(exc: BaseException) -> str:
    """An error's message in one line, masked: library errors can carry a URI's password."""
    text = str(exc).strip().splitlines()
    return mask(text[0] if text else type(exc).__name__)


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """Env vars fit to show: values of secret-looking names masked whole, the rest by `mask`."""
    return {k: MASK if is_secret_name(k) else mask(v) for k, v in env.items()}


def split_userinfo(uri: str) -> tuple[str, str | None]:
    """`uri` without its userinfo, and the userinfo (None when it has none), percent-encoded."""
    match = _URI.match(uri)
    if match is None:
        return uri, None
    at = _userinfo_end(match["rest"])
    if at is None:
        return uri, None
    return match["scheme"] + match["rest"][at + 1 :], match["rest"][:at]


def public_dump(data: Any, path: tuple[str, ...] = ()) -> Any:
    """A dumped workload (or any part at `path`) fit to show: env var values and secrets in
    strings masked. Masking is idempotent, so a dump read back compares equal to a fresh one."""
    if isinstance(data, dict):
        if path == _ENV_VARS:
            return {k: MASK for k in data}
        return {k: public_dump(v, (*path, str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [public_dump(v, path) for v in data]
    return mask(data) if isinstance(data, str) else data


def public_spec(spec: WorkloadSpec) -> dict[str, Any]:
    """The resolved workload as plain data, fit to show, log or write (see `public_dump`)."""
    dumped: dict[str, Any] = public_dump(spec.model_dump(mode="json"))
    return dumped


def public_yaml(spec: WorkloadSpec) -> str:
    """`public_spec` as YAML, in the spec's field order."""
    return yaml.safe_dump(public_spec(spec), sort_keys=False)


def secret_fields(data: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Dotted fields of a dumped workload (or of its part at `path`) holding a secret that
    `mask` would hide."""
    if isinstance(data, dict):
        return [f for k, v in data.items() for f in secret_fields(v, (*path, str(k)))]
    if isinstance(data, list):
        return list(dict.fromkeys(f for v in data for f in secret_fields(v, path)))
    return [".".join(path)] if isinstance(data, str) and mask(data) != data else []


def _mask_uri(match: re.Match[str]) -> str:
    rest = match["rest"]
    at = _userinfo_end(rest)
    if at is None:
        return match[0]
    user, colon, password = rest[:at].partition(":")
    shown = f"{user}:{MASK}" if user and colon and password else MASK
    return f"{match['scheme']}{shown}{rest[at:]}"


def _userinfo_end(rest: str) -> int | None:
    """Where the userinfo of a URI's `rest` (after `://`) ends: the last `@` before the host."""
    for at in reversed([i for i, c in enumerate(rest) if c == "@"]):
        if _HOST_START.match(rest, at + 1) and _is_userinfo(rest[:at]):
            return at
    return None


def _is_userinfo(text: str) -> bool:
    """Whether `text`, before an `@`, is userinfo rather than a path (`host/repo@v1`).

    A password may hold `/`: `user:pa/ss` is userinfo, `host:8080/repo` is not (a port).
    """
    if not text:
        return False
    if not any(c in text for c in "/?#"):
        return True
    user, colon, password = text.partition(":")
    secret = password.split("/", 1)[0]
    return (
        bool(colon)
        and not any(c in user for c in "/?#@")
        and "@" not in secret
        and not secret.isdigit()
    )


def _mask_assignment(match: re.Match[str]) -> str:
    name = match["name"].strip("\"' :=")
    if not is_secret_name(name) or match["value"] == MASK:
        return match[0]
    return f"{match['name']}{match['scheme'] or ''}{MASK}"
