"""Reaching a Ray cluster's Jobs API: which address, which token, and refusing an open cluster.

An open Jobs API is remote code execution for anyone who can reach it (CVE-2023-48022), so
orch probes the API without credentials before it submits anything: a cluster that answers is
refused unless the user says `--allow-insecure`. orch always sends the token itself, in the
`Authorization` header, instead of relying on Ray's client, which adds it only when the calling
process happens to run with `RAY_AUTH_MODE=token`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import JobsError
from orchestrator.masking import mask

__all__ = [
    "Cluster",
    "JobsError",
    "connect",
    "find_token",
    "resolve_address",
]

DASHBOARD_PORT = 8265
_PROBE_TIMEOUT_S = 10


def resolve_address(flag: str | None, workload_address: str | None) -> tuple[str, str]:
    """The dashboard URL and where it came from: --address, $ORCH_ADDRESS, $RAY_ADDRESS, the
    workload's cluster.address, in that order."""
    for value, source in (
        (flag, "--address"),
        (os.environ.get("ORCH_ADDRESS"), "$ORCH_ADDRESS"),
        (os.environ.get("RAY_ADDRESS"), "$RAY_ADDRESS"),
        (workload_address, "cluster.address"),
    ):
        if value:
            return _dashboard_url(value, source), source
    raise JobsError(
        "no cluster address: pass --address http://HEAD:8265, set ORCH_ADDRESS, or set "
        "cluster.address in the workload"
    )


def _dashboard_url(value: str, source: str) -> str:
    value = value.strip().rstrip("/")
    if value.startswith("ray://"):
        raise JobsError(
            f"{source} is {mask(value)!r}, a Ray Client address; orch submits through the Jobs "
            f"API: use the dashboard address, http://HOST:{DASHBOARD_PORT}"
        )
    if value in ("auto", "local"):
        raise JobsError(
            f"{source} is {mask(value)!r}; give the cluster's dashboard address, "
            f"http://HOST:{DASHBOARD_PORT}"
        )
    if "://" not in value:
        value = f"http://{value}"
    if not value.startswith(("http://", "https://")):
        raise JobsError(f"{source} {mask(value)!r}: use http://HOST:PORT or https://HOST:PORT")
    return value


def find_token() -> tuple[str | None, str]:
    """Ray's token and where it came from.

    The order is Ray's own: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "$RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    for path, source in (
        (Path(path_env).expanduser() if path_env else None, f"$RAY_AUTH_TOKEN_PATH ({path_env})"),
        (Path.home() / ".ray" / "auth_token", "~/.ray/auth_token"),
    ):
        if path is not None and path.is_file():
            token = path.read_text().strip()
            if token:
                return token, source
    return None, "no token"


@dataclass(repr=False)
class Cluster:
    """A connected cluster: the Jobs client and the State API client, both carrying the token."""

    url: str  # may carry credentials: `mask` it to show it
    jobs: Any  # ray.job_submission.JobSubmissionClient
    headers: dict[str, str]  # the token
    authenticated: bool  # False only when --allow-insecure let an open cluster through

    def __repr__(self) -> str:
        return f"Cluster(url={mask(self.url)!r}, authenticated={self.authenticated})"

    def state(self) -> Any:
        from ray.util.state.api import StateApiClient

        return StateApiClient(
            self.url, headers={"Content-Type": "application/json", **self.headers}
        )

    def job_url(self, submission_id: str) -> str:
        """The job's page in the dashboard, fit to show."""
        return mask(f"{self.url}/#/jobs/{submission_id}")


def connect(
    flag_address: str | None, workload_address: str | None, allow_insecure: bool = False
) -> Cluster:
    """Connect to the Jobs API with the token; refuse an open cluster unless allowed."""
    _quiet_ray_client()
    url, source = resolve_address(flag_address, workload_address)
    shown = mask(url)
    open_api = _accepts_anonymous(url, source)
    token, token_source = find_token()
    if open_api and not allow_insecure:
        raise JobsError(
            f"the cluster at {shown} accepts job submissions without authentication: anyone who "
            "can reach it can run code on it. Start it with token auth (RAY_AUTH_MODE=token "
            "ray start --head ...; see cluster/README.md), or pass --allow-insecure if the "
            "cluster is only reachable by you"
        )
    headers = {"Authorization": f"Bearer {token}"} if token and not open_api else {}
    if not open_api and not token:
        raise JobsError(
            f"the cluster at {shown} requires Ray's auth token and none was found: set "
            "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it (on the head node, "
            "`ray get-auth-token` prints it)"
        )
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        raise JobsError(
            f"the cluster at {shown} rejected the token from {token_source}: use the cluster's "
            "token (on the head node, `ray get-auth-token` prints it) in RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH"
        ) from None
    except ConnectionError as exc:
        raise JobsError(
            mask(f"cannot reach the Ray dashboard at {url} ({source}): {exc}")
        ) from None
    return Cluster(url=url, jobs=client, headers=headers, authenticated=not open_api)


def _accepts_anonymous(url: str, source: str) -> bool:
    """True when the Jobs API answers a request that carries no credentials."""
    import requests

    try:
        response = requests.get(f"{url}/api/jobs/", timeout=_PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise JobsError(
            f"cannot reach the Ray dashboard at {mask(url)} ({source}): {type(exc).__name__}; "
            f"check the address (the dashboard listens on port {DASHBOARD_PORT} by default) and "
            "that the cluster is up"
        ) from None
    if response.status_code in (401, 403):
        return False
    if response.ok:
        return True
    raise JobsError(
        f"{mask(url)} ({source}) answered HTTP {response.status_code} on the Jobs API; is this a "
        f"Ray dashboard address (default port {DASHBOARD_PORT})?"
    )


def _quiet_ray_client() -> None:
    """Ray's client narrates packaging file by file and each log stream's end; orch prints one
    line about an upload, and says itself when a stream ends."""
    import logging

    # These modules set their loggers to INFO when imported: import them first.
    import ray.dashboard.modules.job.sdk  # noqa: F401

    for logger in (
        "ray._private.runtime_env.packaging",
        "ray._private.runtime_env.working_dir",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(logger).setLevel(logging.WARNING)
