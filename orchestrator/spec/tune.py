"""The `tune:` section and the sweep's checks of it against the rest of the workload.

A search space names dotted paths of the workload; what may be searched, and which values
could ever run, depends on the workload, so those checks live here beside the tune spec and
WorkloadSpec calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from orchestrator.spec.base import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Problem,
    Section,
    SpecFieldError,
)
from orchestrator.spec.data import StreamSettings
from orchestrator.spec.model import MODEL_SECTIONS, reported_metrics

if TYPE_CHECKING:
    from orchestrator.spec.workload import WorkloadSpec

__all__ = [
    "STREAM_DATA_FIELDS",
    "Domain",
    "TuneSchedulerSpec",
    "TuneSpec",
    "sample_errors",
    "sampled",
    "tune_problems",
]


class Domain(Section):
    """One search dimension: exactly one of the keys below."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], log scale.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high].")
    randint: tuple[int, int] | None = Field(None, description="[low, high) integers.")
    choice: list[Any] | None = Field(None, min_length=1, description="Sample one of these.")
    grid: list[Any] | None = Field(None, min_length=1, description="Try every one of these.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        set_keys = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(set_keys) != 1:
            allowed = ", ".join(type(self).model_fields)
            got = ", ".join(set_keys) or "none"
            raise ValueError(f"give exactly one of {allowed}; got {got}")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class TuneSchedulerSpec(Section):
    kind: Literal["fifo", "asha", "pbt"] = Field("fifo", description="Trial scheduler.")
    grace_period: PositiveInt = Field(
        1, description="ASHA: reports of the metric (evaluations) before a trial can be stopped."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: halving rate.")
    perturbation_interval: PositiveInt = Field(
        2, description="PBT: checkpoints (each with the metric) between exploit/explore."
    )


class TuneSpec(Section):
    metric: str = Field("eval_loss", description="Metric to optimize.")
    mode: Literal["min", "max"] = Field("min", description="Minimize or maximize the metric.")
    num_samples: PositiveInt = Field(8, description="Trials to sample (per grid point for grid).")
    max_concurrent_trials: PositiveInt | None = Field(
        None, description="Trials running at once; null: as many as resources allow."
    )
    time_budget_s: PositiveFloat | None = Field(None, description="Stop the sweep after this.")
    search: Literal["random", "grid", "optuna"] = Field("random", description="Search algorithm.")
    scheduler: TuneSchedulerSpec = Field(
        default_factory=TuneSchedulerSpec, description="Trial scheduler."
    )
    space: dict[str, Domain] = Field(min_length=1, description="Dotted spec path -> search domain.")
    max_retries: NonNegativeInt = Field(1, description="Retries of a failing trial.")

    @model_validator(mode="after")
    def _search_fits_space(self) -> TuneSpec:
        kinds = {path: d.kind for path, d in self.space.items()}
        problems: list[Problem] = []
        if self.search == "optuna":
            problems += [
                (("space", p), "grid is not supported by optuna; use choice")
                for p, k in kinds.items()
                if k == "grid"
            ]
        if self.search == "optuna":
            # Optuna's categorical distributions hold scalars only.
            problems += [
                (("space", p), "optuna choices must be numbers, strings, booleans or null")
                for p, d in self.space.items()
                if d.choice and not all(_is_scalar(v) for v in d.choice)
            ]
            if self.scheduler.kind == "pbt":
                problems.append(
                    (("search",), "pbt picks the configs itself; use search random or grid")
                )
        if self.search == "grid":
            problems += [
                (("space", p), f"search 'grid' needs grid domains, got {k}")
                for p, k in kinds.items()
                if k != "grid"
            ]
        if problems:
            raise SpecFieldError(problems)
        return self


def tune_problems(spec: WorkloadSpec, tune: TuneSpec) -> list[Problem]:
    """What in `tune` does not fit the rest of `spec`: paths, scheduler needs, metric, values."""
    problems: list[Problem] = []
    dumped = spec.model_dump(mode="json")
    for path in tune.space:
        where = ("tune", "space", path)
        if not _has_path(dumped, path.split(".")):
            problems.append((where, _no_such_path(path, dumped)))
        elif (why := _unsearchable(path, tune.scheduler.kind)) is not None:
            problems.append((where, why))
    if tune.scheduler.kind == "pbt" and spec.train.checkpoint_every is None:
        problems.append(
            (
                ("tune", "scheduler", "kind"),
                "pbt restores from checkpoints: set train.checkpoint_every",
            )
        )
    elif tune.scheduler.kind == "pbt" and tune.metric.startswith("eval_"):
        every, saved = spec.train.eval_every, spec.train.checkpoint_every or 0
        if not every or saved % every:
            problems.append(
                (
                    ("train", "eval_every"),
                    f"pbt compares trials at their checkpoints, which must carry "
                    f"{tune.metric}: set eval_every to a divisor of train.checkpoint_every "
                    f"({saved})",
                )
            )
    reported = reported_metrics(spec.model)
    # A custom step reports metrics of its own choosing, known only once it runs.
    if spec.train.step is None and tune.metric not in reported:
        problems.append(
            (
                ("tune", "metric"),
                f"{tune.metric!r} is not a metric this model reports; one of: "
                + ", ".join(reported),
            )
        )
    if not problems:  # values are only worth checking on paths that can be searched
        del dumped["tune"]
        problems += _value_problems(dumped, tune.space)
    return problems


def sampled(spec: WorkloadSpec, values: dict[str, Any]) -> WorkloadSpec:
    """`spec` with `values` (dotted path -> value) set and no tune section.

    Raises pydantic's ValidationError when a value does not fit; `sample_errors` words it.
    """
    from orchestrator.spec.workload import WorkloadSpec  # workload.py imports this module

    dumped = spec.model_dump(mode="json", exclude={"tune"})
    return WorkloadSpec.model_validate(_with_values(dumped, values))


# A sweep prepares the data once and shares it, so of `data` only these can differ by trial.
STREAM_DATA_FIELDS = tuple(StreamSettings.model_fields)


def _unsearchable(path: str, scheduler: str) -> str | None:
    """Why a field that exists cannot be a search dimension, or None when it can."""
    top, _, rest = path.partition(".")
    if top in ("name", "tune", "tracking", "cluster") or path == "train.storage_path":
        return "this field cannot be searched: it names, tracks or places the sweep"
    if top == "data" and rest.split(".")[0] not in STREAM_DATA_FIELDS:
        allowed = ", ".join(f"data.{f}" for f in STREAM_DATA_FIELDS)
        return (
            "the data is prepared once and shared by every trial, so this field cannot be "
            f"searched; of data, only {allowed} can"
        )
    if scheduler == "pbt" and top != "train" and path not in ("model.dropout",):
        return (
            "pbt copies weights between trials, so it can only search fields that keep the "
            "model and its layout: train.*, model.dropout, "
            + ", ".join(f"data.{f}" for f in STREAM_DATA_FIELDS)
        )
    return None


def _no_such_path(path: str, dumped: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(path, sorted(_leaf_paths(dumped)), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"no such field in the workload to search over{hint}"


def _leaf_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def _value_problems(dumped: dict[str, Any], space: dict[str, Domain]) -> list[Problem]:
    """Values of the space that no trial could run with, found before any trial starts.

    Each candidate (every choice and grid value, the ends of each range) is tried with the
    other dimensions' candidates too: a value is refused only when it fails in every tried
    combination, since a field can be valid only together with another searched field.
    """
    import itertools

    from orchestrator.spec.workload import WorkloadSpec  # workload.py imports this module

    candidates = {path: _candidates(domain) for path, domain in space.items()}
    problems: list[Problem] = []
    for path, values in candidates.items():
        others = [(p, [v for v, _ in c]) for p, c in candidates.items() if p != path]
        combos = list(itertools.islice(itertools.product(*(v for _, v in others)), 16))
        for value, label in values:
            errors: list[str] = []
            for combo in combos:
                sample = {path: value} | {p: v for (p, _), v in zip(others, combo, strict=True)}
                try:
                    WorkloadSpec.model_validate(_with_values(dumped, sample))
                except ValueError as exc:  # pydantic's ValidationError is a ValueError
                    errors = errors or sample_errors(exc)
                else:
                    errors = []
                    break
            if errors:
                problems.append((("tune", "space", path), f"{label}: {errors[0]}"))
                break  # one bad value per dimension says enough
    return problems


def _candidates(domain: Domain) -> list[tuple[Any, str]]:
    """Values to check for a domain, with how to name each in an error."""
    import math

    if domain.choice is not None or domain.grid is not None:
        return [(v, f"value {v!r} is invalid") for v in (domain.choice or domain.grid or [])]
    if domain.randint is not None:
        first, last = domain.randint
        return [
            (first, f"low bound {first} is invalid"),
            (last - 1, f"{last - 1} (high - 1) is invalid"),
        ]
    low, high = domain.loguniform or domain.uniform or (0.0, 0.0)
    # Sampling never returns `high` itself, but values just below it.
    return [
        (low, f"low bound {low!r} is invalid"),
        (math.nextafter(high, low), f"values near the high bound {high!r} are invalid"),
    ]


def _with_values(dumped: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(dumped)
    for path, value in values.items():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = value
    return out


def sample_errors(exc: ValueError) -> list[str]:
    """A failed validation of a sampled workload as 'field: what is wrong' lines."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return [str(exc)]
    out = []
    for err in errors(include_url=False):
        # Discriminator tags (the model kind) appear in locations; they are not fields.
        loc = [str(p) for p in err["loc"] if p not in MODEL_SECTIONS]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecFieldError):
            out += [".".join([*loc, *rel]) + f": {msg}" for rel, msg in cause.problems]
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and _is_scalar(err.get("input")):
            message += f" (got {err['input']!r})"
        out.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return out


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _has_path(dumped: Any, parts: list[str]) -> bool:
    """Whether a dotted path names a set field of the spec (for tune.space keys)."""
    for part in parts:
        if isinstance(dumped, dict) and part in dumped:
            dumped = dumped[part]
        else:
            return False
    return True
