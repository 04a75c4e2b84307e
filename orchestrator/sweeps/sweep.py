"""The sweep driver: prepare the data once, check the plan, run a Ray Tune sweep of Train runs.

`orch tune` and `orch run` (for a workload with a `tune` section) call `run_sweep`. The sweep
lives in `train.storage_path/<name>`: Tune's experiment state, one directory per trial (its
Train runs, checkpoints and exported model), `orch_sweep.yaml` (the workload it was started
with, checked on resume) and `best_workload.yaml` (the best trial as a workload to run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from orchestrator.errors import RunError
from orchestrator.masking import public_dump, public_spec
from orchestrator.spec import WorkloadSpec
from orchestrator.stopping import Stopped, stop_signals
from orchestrator.train.session import filesystem_of
from orchestrator.train.trainer import PreparedRun

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker
from orchestrator.sweeps.observe import SweepObserver, register, unregister
from orchestrator.sweeps.results import SweepResult, TrialRow, finish, row
from orchestrator.sweeps.trial import TrialSetup, plan_splits, trains_in_trial, trial_resources

__all__ = ["EndedTrials", "SweepInterrupted", "run_sweep", "run_trials"]

SWEEP_SPEC = "orch_sweep.yaml"
T = TypeVar("T")


class SweepInterrupted(Stopped):
    """The sweep was stopped (Ctrl-C, SIGTERM) before its trials ended; it can be resumed."""


def run_sweep(
    spec: WorkloadSpec,
    *,
    address: str | None = None,
    name: str | None = None,
    resume: bool | None = None,
    verbose: bool = False,
    tracking: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> SweepResult:
    """Run (or with `resume`, continue) the sweep of a workload's `tune` section.

    resume: True continues an existing sweep, False refuses one, None continues it if it
    exists (what `orch run` does, as it does for runs).
    """
    if spec.tune is None:
        raise RunError("the workload has no tune section; use orch run")
    return run_trials(
        spec,
        _ranked,
        address=address,
        name=name,
        resume=resume,
        verbose=verbose,
        tracking=tracking,
        log=log,
    )


@dataclasses.dataclass(frozen=True)
class EndedTrials:
    """A sweep whose trials have all ended, as its conclusion gets it."""

    spec: WorkloadSpec
    name: str
    path: str  # the sweep's directory (local path or URI)
    local: Path  # where its local files go
    run: PreparedRun  # the data the trials shared
    results: list[Any]  # Tune's Result of each trial
    rows: list[TrialRow]
    parent: Tracker | None  # the sweep's MLflow run, still open: the conclusion ends it
    notes: list[str]
    seconds: float
    log: Callable[[str], None]


def _ranked(ended: EndedTrials) -> SweepResult:
    """A sweep's conclusion: its trials ranked, the best one's workload and model kept (and
    exported in the workload's `export:` formats)."""
    e = ended
    return finish(e.spec, e.name, e.path, e.local, e.rows, e.parent, e.notes, e.seconds, e.log)


def run_trials(
    spec: WorkloadSpec,
    conclude: Callable[[EndedTrials], T],
    *,
    address: str | None,
    name: str | None,
    resume: bool | None,
    verbose: bool,
    tracking: bool,
    log: Callable[[str], None],
) -> T:
    """Run (or continue) the trials of `spec.tune` to their end, then `conclude` them (a
    sweep ranks them, a cross-validation summarizes its folds: sweeps/cv.py)."""
    from orchestrator.ray_session import ray_session
    from orchestrator.runlock import run_lock
    from orchestrator.train.trainer import check_inputs, local_dir, storage_uri

    assert spec.tune is not None
    started = time.monotonic()
    name = name or spec.name
    check_inputs(spec)
    # Tune ends a sweep on Ctrl-C itself, saving its state; SIGTERM is handed to it alike.
    with (
        run_lock(storage_uri(spec.train.storage_path), name),
        ray_session(address, verbose),
        # After Ray starts: its core worker installs a SIGTERM handler of its own, which aborts.
        stop_signals(raising=False) as received,
    ):
        run = _prepare_and_check(spec, address, verbose, log)
        concurrency = _concurrency(spec, on_this_machine=address is None)
        path = f"{storage_uri(spec.train.storage_path)}/{name}"
        local = Path(local_dir(path))
        restoring = _check_sweep_dir(path, spec, resume)
        manifest = run.prepared.manifest
        data_hash = manifest.get("cache_key") or manifest["source_fingerprint"]
        parent = _start_tracking(spec, name, data_hash, local) if tracking else None
        if parent is not None:
            log(f"tracking: MLflow run {parent.run_id} (one nested run per trial)")
        observer = SweepObserver(spec, name, parent, data_hash, local, log)
        try:
            # The folds of a cross-validation each read their own splits (unless it runs one).
            shared = trains_in_trial(spec) and (spec.cv is None or spec.cv.fold is not None)
            datasets = plan_splits(spec, run) if shared else None
            setup = TrialSetup(spec=spec, run=run, sweep_path=path, janitor=None, datasets=datasets)
            kind = "cross-validation" if spec.cv is not None else "sweep"  # sweeps/cv.py
            log(
                f"{'resuming' if restoring else 'starting'} {kind} {name}: {concurrency} "
                f"trial(s) at a time, in {path}"
            )
            grid = _fit(setup, observer, concurrency, restoring, verbose)
            if unfinished := _unfinished(path):
                raise SweepInterrupted(
                    received[0] if received else signal.SIGINT,
                    f"sweep {name} stopped with {unfinished} trial(s) unfinished; its state "
                    "is saved: continue it with orch tune FILE --resume",
                )
            results = list(grid)
            rows = [row(result, spec.tune.metric, spec.tune.space) for result in results]
        except BaseException as error:  # stopped or failed: its MLflow runs end all the same
            if parent is not None:
                status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                for note in observer.end_unfinished(status) + parent.finish(status, None, None):
                    log(note)
            raise
    seconds = time.monotonic() - started
    return conclude(
        EndedTrials(
            spec, name, path, local, run, results, rows, parent, observer.notes, seconds, log
        )
    )


def _prepare_and_check(
    spec: WorkloadSpec, address: str | None, verbose: bool, log: Callable[[str], None]
) -> PreparedRun:
    """The data every trial shares, prepared once; RunError for what no trial could run."""
    from orchestrator.train.trainer import prepare_run

    assert spec.tune is not None
    run = prepare_run(spec, address=address, verbose=verbose, log=log)
    # A cross-validation evaluates on its folds of the training split, not on the eval split.
    if spec.tune.metric.startswith("eval_") and not run.prepared.files("eval") and not spec.cv:
        raise RunError(f"tune.metric: {spec.tune.metric} needs eval data, and there is none")
    return run


def _fit(
    setup: TrialSetup, observer: SweepObserver, concurrency: int, restoring: bool, verbose: bool
) -> Any:
    """Run (or restore and continue) the Tuner; free what stopped trials held, however it ends."""
    import ray

    from orchestrator.sweeps.janitor import PlacementGroupJanitor

    janitor = None
    if not trains_in_trial(setup.spec):  # only TorchTrainers leave placement groups behind
        janitor = PlacementGroupJanitor.remote()  # type: ignore[attr-defined]
        observer.janitor = janitor
        setup = dataclasses.replace(setup, janitor=janitor)
    register(setup.sweep_path, observer)
    try:
        with _quiet_tune(verbose):
            return _tuner(setup, concurrency, restoring, verbose).fit()
    finally:
        unregister(setup.sweep_path)
        if janitor is not None:
            ray.get(janitor.collect.remote())  # before this Ray runs anything else
            ray.kill(janitor)


def _unfinished(path: str) -> int:
    """Trials a stopped sweep (Ctrl-C) left to resume.

    Tune ends such a sweep and returns like a finished one; the state it saved just before
    stopping the trials still has them running or waiting.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(path).trials
    return sum(t.status in ("RUNNING", "PENDING", "PAUSED") for t in trials)


@contextlib.contextmanager
def _quiet_tune(verbose: bool) -> Iterator[None]:
    """orch prints one line per trial event and the table; without --verbose, Tune prints
    nothing itself: no status tables, and no tracebacks of failed trials (a trial's error is
    its line in the table; the whole traceback is in its directory's error.txt)."""
    if verbose:
        yield
        return
    tune_log = logging.getLogger("ray.tune")
    level, saved = tune_log.level, os.environ.get("RAY_AIR_NEW_OUTPUT")
    tune_log.setLevel(logging.CRITICAL)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter, silent at verbose 0
    try:
        yield
    finally:
        tune_log.setLevel(level)
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def _tuner(setup: TrialSetup, concurrency: int, restoring: bool, verbose: bool) -> Any:
    from ray import tune

    from orchestrator.sweeps.observe import Relay
    from orchestrator.sweeps.space import param_space, population, scheduler, search_algorithm
    from orchestrator.sweeps.trial import run_trial, trial_dir_name

    spec, path = setup.spec, setup.sweep_path
    assert spec.tune is not None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        tune.PlacementGroupFactory([trial_resources(spec)]),
    )
    if restoring:
        # Errored trials get another go: the cause may have been fixed since.
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    t = spec.tune
    return tune.Tuner(
        trainable,
        param_space=param_space(t.space),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=search_algorithm(t, seed=spec.train.seed, concurrency=concurrency),
            scheduler=scheduler(t, all_at_once=population(t) <= concurrency),
            num_samples=t.num_samples,
            time_budget_s=t.time_budget_s,
            trial_dirname_creator=trial_dir_name,
            # A trial that trains in its own process hands it on to the next trial (its imports
            # done, no process to start): Tune stops the training thread at its report first.
            # Not so for TorchTrainer trials: a kept process's trainer would go on training,
            # holding its workers, until the next trial starts.
            reuse_actors=trains_in_trial(spec),
        ),
        run_config=tune.RunConfig(
            name=path.rstrip("/").rsplit("/", 1)[-1],
            storage_path=path.rstrip("/").rsplit("/", 1)[0],
            failure_config=tune.FailureConfig(max_failures=t.max_retries),
            # Checkpoints reach Tune under PBT only, and all are kept: Tune deleting old ones
            # races with PBT registering the same checkpoint twice (on report and on save).
            callbacks=[Relay(path)],
            verbose=1 if verbose else 0,
        ),
    )


def _concurrency(spec: WorkloadSpec, on_this_machine: bool) -> int:
    """Trials at once, as the plan allows (`plan.trials_at_once`)."""
    import ray

    from orchestrator.plan import PlanError, trials_at_once
    from orchestrator.sweeps.trial import TRAINER_TRIAL_CPU

    assert spec.tune is not None
    trial_cpu = 0.0 if trains_in_trial(spec) else TRAINER_TRIAL_CPU  # beside its workers
    try:
        return trials_at_once(
            spec.scaling,
            spec.tune,
            ray.cluster_resources(),
            trial_cpu,
            on_this_machine,
            folds=spec.cv is not None,
        )
    except PlanError as exc:
        raise RunError(str(exc)) from None


def _check_sweep_dir(path: str, spec: WorkloadSpec, resume: bool | None) -> bool:
    """Whether to restore the sweep at `path`; refuse what would mix two different sweeps."""
    from ray import tune

    exists = tune.Tuner.can_restore(path)
    if resume is True and not exists:
        raise RunError(f"no sweep to resume at {path}; start it without --resume")
    if resume is False and exists:
        raise RunError(
            f"a sweep already exists at {path}; continue it with --resume, "
            "or start another with --name NEW"
        )
    # Compared masked: the file is written masked, and a sweep written before masking compares
    # all the same.
    current = public_spec(spec)
    if exists:
        saved = public_dump(yaml.safe_load(_read(f"{path}/{SWEEP_SPEC}") or "null"))
        if saved is not None and saved != current:
            changed = _changed_fields(saved, current)
            raise RunError(
                f"the workload changed since the sweep at {path} started ({', '.join(changed)}); "
                "resume it with the workload it started with, or start another with --name NEW"
            )
    else:
        _write(f"{path}/{SWEEP_SPEC}", yaml.safe_dump(current, sort_keys=False))
    return exists


def _start_tracking(spec: WorkloadSpec, name: str, data_hash: str, local: Path) -> Tracker | None:
    if not spec.tracking.mlflow.enabled:
        return None
    from orchestrator.tracking import TrackingError, start_tracker

    try:
        return start_tracker(spec, name, data_hash, local)
    except TrackingError as exc:
        raise RunError(str(exc)) from None


def _changed_fields(saved: Any, current: Any) -> list[str]:
    from orchestrator.tracking import flatten

    a, b = flatten(saved), flatten(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[:5]


def _read(uri: str) -> str | None:
    import pyarrow.fs as pafs

    fs, path = filesystem_of(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _write(uri: str, text: str) -> None:
    fs, path = filesystem_of(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
