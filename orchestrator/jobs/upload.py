"""The job's runtime environment: the working directory (minus what must not travel), the
resolved workload, env vars and pip requirements; and an early, clear refusal of an upload
larger than Ray accepts, naming what makes it large.

What travels is decided by rules, each named so that `orch submit --dry-run` can say which one
left a file out: the credential deny-list, orch's defaults, the workload's own local paths,
`cluster.runtime_env.excludes`, `.orchignore` (all passed to Ray as `excludes`), then Ray's
`.gitignore` and `.rayignore`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.jobs.connect import JobsError
from orchestrator.spec import WorkloadSpec

__all__ = [
    "CREDENTIAL_EXCLUDES",
    "DEFAULT_EXCLUDES",
    "LeftOut",
    "Upload",
    "UploadPlan",
    "build_runtime_env",
    "plan_upload",
]

# Never useful on the cluster, often large: version control, environments, caches, local
# checkpoints, local MLflow stores.
DEFAULT_EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
    "mlflow.db",
    "mlruns/",
    "mlartifacts/",
    "orch_runs/",
    "orch_exports/",
]
# Credentials and local secrets, at any depth: never uploaded. They come last in Ray's excludes,
# so no `!pattern` in .orchignore or cluster.runtime_env.excludes brings one back; a job gets its
# secrets from the cluster (its env vars, a secret store), not from a laptop's files. Patterns
# stay narrow (`*credentials*` would also drop a `credentials.py` the job imports), and every
# file left out here is named in a warning, so a false positive shows at once.
CREDENTIAL_EXCLUDES = [
    ".env",  # dotenv files; also a virtualenv named .env, which must not travel either
    ".env.*",  # .env.local, .env.production (and .env.example, a harmless loss)
    "*.pem",  # private keys and certificates
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",  # SSH keys wherever they lie (.pub included: no job needs one)
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".ssh/",
    ".gnupg/",
    ".aws/",
    ".azure/",
    ".kube/",
    "kubeconfig",
    "**/.config/gcloud/",
    "**/.docker/config.json",
    ".ray/",  # Ray's auth_token
    "auth_token",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    ".htpasswd",
    "*credentials.json",  # credentials.json, gcloud's application_default_credentials.json
    "service-account*.json",
    "service_account*.json",
    "*.tfstate",
    "*.tfstate.backup",
    "mlflow_pending.jsonl",  # a run's unsent reports: its tracking URI may carry a password
]
ORCHIGNORE = ".orchignore"  # gitignore syntax, at the working directory's root
# The rules' names, as the dry run and the warning print them.
CREDENTIALS = "credential deny-list"
DEFAULTS = "default excludes"
LOCAL_PATHS = "data.cache_dir/train.storage_path"
SPEC_EXCLUDES = "cluster.runtime_env.excludes"
# `orch stop` (Ray's stop_job) sends the job SIGTERM, then SIGKILL after this many seconds, 3 by
# Ray's default: too few for the driver to end its MLflow run and keep what the server did not take.
STOP_WAIT = {"RAY_JOB_STOP_WAIT_TIME_S": "45"}
WORKLOAD_ENV = "ORCH_WORKLOAD"  # the resolved workload, as YAML, for the job's entrypoint


@dataclass(frozen=True)
class LeftOut:
    path: str  # relative to the working directory; a directory ends in /
    rule: str  # CREDENTIALS, DEFAULTS, ..., or the ignore file's path (.gitignore, sub/.rayignore)
    files: int | None = 1  # under a directory: counted when Ray looked inside, else None


@dataclass(frozen=True)
class UploadPlan:
    root: Path
    excludes: list[str]  # the patterns Ray gets, in order
    sent: list[tuple[str, int]]  # (relative path, bytes) of every file Ray will zip
    left_out: list[LeftOut]

    @property
    def size_bytes(self) -> int:
        """Uncompressed bytes that will be zipped and uploaded."""
        return sum(size for _, size in self.sent)

    @property
    def secrets(self) -> list[str]:
        """The secret-looking files and directories left out."""
        return [entry.path for entry in self.left_out if entry.rule == CREDENTIALS]

    @property
    def notes(self) -> list[str]:
        """A warning naming the secrets left out (their paths, never their contents)."""
        if not self.secrets:
            return []
        return [f"left out secret-looking files, never uploaded: {', '.join(self.secrets)}"]


@dataclass(frozen=True)
class Upload:
    runtime_env: dict[str, Any]
    plan: UploadPlan

    @property
    def size_bytes(self) -> int:
        return self.plan.size_bytes

    @property
    def files(self) -> int:
        return len(self.plan.sent)


def build_runtime_env(
    spec: WorkloadSpec,
    workload_yaml: str,
    working_dir: Path,
    credentials: Mapping[str, str] | None = None,
) -> Upload:
    """The runtime_env for the job, after checking the upload fits Ray's limit; `credentials`
    are env vars taken out of the workload (the tracking URI's user and password)."""
    plan = plan_upload(spec, working_dir)
    # The workload's own env vars win, as they would over the URI's credentials in MLflow.
    env_vars = {**STOP_WAIT, **(credentials or {}), **spec.cluster.runtime_env.env_vars}
    env: dict[str, Any] = {
        "working_dir": str(plan.root),
        "excludes": plan.excludes,
        "env_vars": {**env_vars, WORKLOAD_ENV: workload_yaml},
    }
    if spec.cluster.runtime_env.pip:
        env["pip"] = list(spec.cluster.runtime_env.pip)
    return Upload(runtime_env=env, plan=plan)


def plan_upload(spec: WorkloadSpec, working_dir: Path) -> UploadPlan:
    """What the upload of `working_dir` holds and leaves out, by which rule; refuses an upload
    over Ray's limit."""
    root = working_dir.resolve()
    # Prepared data is rebuilt on the cluster; checkpoints stay where they are.
    local = [
        f"/{inside}/"
        for path in (spec.data.cache_dir, spec.train.storage_path)
        if (inside := _relative_inside(path, root))
    ]
    rules = [
        (DEFAULTS, DEFAULT_EXCLUDES),
        (LOCAL_PATHS, local),
        (SPEC_EXCLUDES, list(spec.cluster.runtime_env.excludes)),
        (ORCHIGNORE, _orchignore(root)),
        (CREDENTIALS, CREDENTIAL_EXCLUDES),  # last: see CREDENTIAL_EXCLUDES
    ]
    sent, left_out = _walk(root, rules)
    plan = UploadPlan(root, [p for _, patterns in rules for p in patterns], sent, left_out)
    _check_size(plan)
    return plan


def _relative_inside(path: str, root: Path) -> str | None:
    if "://" in path:
        return None
    absolute = Path(os.path.abspath(path))
    try:
        inside = absolute.relative_to(root)
    except ValueError:
        return None
    return str(inside) if str(inside) != "." else None


def _orchignore(root: Path) -> list[str]:
    path = root / ORCHIGNORE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


Match = Callable[[Path], bool]


def _walk(
    root: Path, rules: list[tuple[str, list[str]]]
) -> tuple[list[tuple[str, int]], list[LeftOut]]:
    """The files Ray will zip, and what it leaves out by which rule.

    Mirrors Ray's own traversal (`_dir_travel`, which cannot report what it skips) with Ray's
    own matchers: one over all the excludes, in order, and the .gitignore and .rayignore of
    each directory for what lies below it. So what is listed is what Ray will zip.
    """
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _get_excludes, _get_ignore_file

    gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    ignore_files = [".gitignore", ".rayignore"] if gitignore else [".rayignore"]
    # The rule that decides is the one holding the last pattern that matches.
    by_rule = [(name, _matcher(root, name, patterns)) for name, patterns in reversed(rules)]
    excluded = _get_excludes(root, [p for _, patterns in rules for p in patterns])
    sent: list[tuple[str, int]] = []
    left_out: list[LeftOut] = []

    def visit(path: Path, ignores: list[tuple[str, Match]]) -> int:
        relative = path.relative_to(root).as_posix()
        if path.is_dir():
            for name in ignore_files:
                if match := _get_ignore_file(path, name):
                    ignores = [*ignores, ((path / name).relative_to(root).as_posix(), match)]
        rule = (
            next((name for name, match in by_rule if match(path)), SPEC_EXCLUDES)
            if excluded(path)
            else next((name for name, match in ignores if match(path)), None)
        )
        if rule is not None:
            directory = path.is_dir()  # left out whole: Ray does not look inside
            left_out.append(LeftOut(relative + "/" * directory, rule, None if directory else 1))
            return 0
        if path.is_file():
            sent.append((relative, path.stat().st_size))
            return 1
        if not path.is_dir():
            return 0
        start = len(left_out)
        files = sum(visit(child, ignores) for child in sorted(path.iterdir()))
        if path != root and not files and (whole := _whole(relative, left_out[start:])):
            left_out[start:] = [whole]
        return files

    visit(root, [])
    return sent, left_out


def _whole(directory: str, below: list[LeftOut]) -> LeftOut | None:
    """`directory` as one entry when one rule left out all of it.

    Ray tests each entry below a directory that a pattern like `.git/` excludes (the pattern
    does not match the directory's own name); naming each would bury the list. A lone file
    keeps its path, so that `.aws/credentials` reads as what it is.
    """
    if not below or len({e.rule for e in below}) > 1:
        return None
    if len(below) == 1 and not below[0].path.endswith("/"):
        return None
    counts = [e.files for e in below]
    files = None if None in counts else sum(c or 0 for c in counts)
    return LeftOut(f"{directory}/", below[0].rule, files)


def _matcher(root: Path, name: str, patterns: list[str]) -> Match:
    from ray._private.runtime_env.packaging import _get_excludes

    for pattern in patterns:
        try:
            _get_excludes(root, [pattern])
        except (ValueError, IndexError):  # Ray's pathspec fails on a bare `!` with IndexError
            raise JobsError(
                f"{name}: {pattern!r} is not a valid gitignore-style pattern; see "
                "https://git-scm.com/docs/gitignore#_pattern_format"
            ) from None
    return _get_excludes(root, patterns)


def _check_size(plan: UploadPlan) -> None:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    # Ray's limit is on the zip; refusing on the uncompressed size is stricter only for
    # well-compressing text, and a working directory that large is a mistake anyway.
    size = plan.size_bytes
    if size < GCS_STORAGE_MAX_SIZE:
        return
    per_top: dict[str, int] = {}
    for path, bytes_ in plan.sent:
        top = path.split("/")[0]
        per_top[top] = per_top.get(top, 0) + bytes_
    biggest = sorted(((s, name) for name, s in per_top.items()), reverse=True)[:3]
    largest = ", ".join(f"{name} ({_mib(s)})" for s, name in biggest)
    raise JobsError(
        f"the working directory {plan.root} would upload {_mib(size)}, over Ray's limit of "
        f"{_mib(GCS_STORAGE_MAX_SIZE)}; the largest entries: {largest}. Keep data on shared "
        "storage (s3://, gs://, NFS) and leave it out with cluster.runtime_env.excludes, "
        f"{ORCHIGNORE}, .gitignore or .rayignore"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
