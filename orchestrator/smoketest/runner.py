"""A smoke run: a workload shrunk by `shrink`, driven through every stage a real run passes.

A run trains in two legs on one local Ray: `LEG_STEPS` steps that end in an evaluation and a
checkpoint, then the same run again to `SMOKE_STEPS`, which must resume from that checkpoint,
evaluate, and export a model that plain torch loads and runs. A sweep runs `SWEEP_TRIALS`
trials and exports the best; a cross-validation runs `CV_FOLDS` folds, each evaluated on its
whole fold, and exports each fold's model. Each stage is checked, not assumed: a stage that
did not happen fails the smoke run (SmokeFailed, exit code 1).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import SmokeFailed
from orchestrator.smoketest.shrink import LEG_STEPS, SMOKE_STEPS, Change, Generated, Shrinking
from orchestrator.spec import WorkloadSpec

if TYPE_CHECKING:
    from orchestrator.driver import RunResult
    from orchestrator.sweeps.cv import CVResult
    from orchestrator.sweeps.results import SweepResult

__all__ = ["DEFAULT_WORKDIR", "SmokeFailed", "SmokeResult", "Stage", "smoke"]

DEFAULT_WORKDIR = Path(".orch") / "smoke"


@dataclass(frozen=True)
class Stage:
    name: str  # prepare, train, evaluate, checkpoint, resume, export, trials
    detail: str


@dataclass
class SmokeResult:
    name: str
    spec: WorkloadSpec  # the shrunk workload that ran
    changes: list[Change]
    generated: list[Generated]  # unreachable sources, replaced by generated data
    stages: list[Stage] = field(default_factory=list)
    seconds: float = 0.0
    workdir: str = ""
    runs: list[RunResult] = field(default_factory=list)  # the legs, in order
    sweep: SweepResult | None = None
    cv: CVResult | None = None


def smoke(
    spec: WorkloadSpec,
    *,
    workdir: str | Path | None = None,
    track: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
) -> SmokeResult:
    """Shrink `spec` to this machine and run it through every stage; SmokeFailed if one is
    missing. Runs, data and (with `track`) MLflow stay under `workdir`."""
    from orchestrator.ray_session import ray_session

    started = time.monotonic()
    root = Path(workdir or DEFAULT_WORKDIR).resolve()
    # What cannot be shrunk is refused before Ray starts; remote data is probed while it starts.
    shrinking = Shrinking(spec, root, track=track)
    with ray_session(None, verbose):
        shrunk = shrinking.finish()
        for change in shrunk.changes:
            log(f"smoke: {change}")
        for source in shrunk.generated:
            log(f"smoke: WARNING: {source}; training on GENERATED data instead")
        result = SmokeResult(
            name=spec.name,
            spec=shrunk.spec,
            changes=shrunk.changes,
            generated=shrunk.generated,
            workdir=str(root),
        )
        # The smoke directory's runs are its own scratch: each smoke run starts from nothing,
        # or its first leg would resume the last smoke run's checkpoints.
        shutil.rmtree(root / "runs" / spec.name, ignore_errors=True)
        if shrunk.spec.tune is not None:
            _run_sweep(shrunk.spec, result, verbose, track, log)
        elif shrunk.spec.cv is not None:
            _run_cv(shrunk.spec, result, verbose, track, log)
        else:
            _run_legs(shrunk.spec, result, verbose, track, log, on_progress)
    result.seconds = time.monotonic() - started
    return result


def _run_legs(
    spec: WorkloadSpec,
    result: SmokeResult,
    verbose: bool,
    track: bool,
    log: Callable[[str], None],
    on_progress: Callable[[dict[str, Any]], None],
) -> None:
    from orchestrator.driver import run_workload

    first_leg = spec.model_copy(
        update={"train": spec.train.model_copy(update={"max_steps": LEG_STEPS})}
    )
    for leg in (first_leg, spec):
        log(f"smoke: training to step {leg.train.max_steps}")
        run = run_workload(
            leg,
            verbose=verbose,
            tracking=track,
            export=leg is spec,  # the second leg's export is the one checked
            log=log,
            on_progress=on_progress,
        )
        result.runs.append(run)
    first, second = result.runs
    result.stages.append(Stage("prepare", f"data in {spec.data.cache_dir}"))
    _check_steps(first, LEG_STEPS, result)
    _check_evaluated(first, result)
    if first.checkpoint is None:
        raise SmokeFailed(f"the first leg ended at step {LEG_STEPS} without a checkpoint")
    result.stages.append(Stage("checkpoint", first.checkpoint))
    resumed_at = min((int(e["step"]) for e in second.history if "step" in e), default=None)
    if resumed_at is None or resumed_at <= LEG_STEPS:
        raise SmokeFailed(
            f"the second leg did not resume from step {LEG_STEPS}: its first report was at "
            f"step {resumed_at}"
        )
    result.stages.append(Stage("resume", f"from step {LEG_STEPS}, first report at {resumed_at}"))
    _check_steps(second, SMOKE_STEPS, result)
    _check_export(second.model_dir, result)
    if track:
        ids = ", ".join(dict.fromkeys(str(r.mlflow_run_id) for r in result.runs))  # resumed: one
        result.stages.append(
            Stage("track", f"MLflow runs {ids} in {spec.tracking.mlflow.tracking_uri}")
        )


def _run_sweep(
    spec: WorkloadSpec,
    result: SmokeResult,
    verbose: bool,
    track: bool,
    log: Callable[[str], None],
) -> None:
    from orchestrator.sweeps import run_sweep

    assert spec.tune is not None
    sweep = run_sweep(spec, resume=False, verbose=verbose, tracking=track, log=log)
    result.sweep = sweep
    result.stages.append(Stage("prepare", f"data in {spec.data.cache_dir}"))
    failed = [t for t in sweep.trials if t.status == "ERROR"]
    if failed or len(sweep.trials) < 2:
        raise SmokeFailed(
            f"{len(sweep.trials)} trial(s) ran, {len(failed)} failed"
            + (f": {failed[0].error}" if failed else "")
        )
    result.stages.append(Stage("trials", f"{len(sweep.trials)} trials"))
    if sweep.best is None or sweep.best.metric is None:
        raise SmokeFailed(f"no trial reported {spec.tune.metric}")
    result.stages.append(Stage("evaluate", f"best {spec.tune.metric} {sweep.best.metric:.4g}"))
    _check_export(sweep.model_dir, result)


def _run_cv(
    spec: WorkloadSpec,
    result: SmokeResult,
    verbose: bool,
    track: bool,
    log: Callable[[str], None],
) -> None:
    from orchestrator.sweeps.cv import run_cv

    assert spec.cv is not None
    cv = run_cv(spec, resume=False, verbose=verbose, tracking=track, log=log)  # every fold ran
    result.cv = cv
    result.stages.append(Stage("prepare", f"data in {spec.data.cache_dir}"))
    rows = ", ".join(f"fold {f.fold}: {f.train_rows} train / {f.eval_rows} eval" for f in cv.folds)
    result.stages.append(Stage("folds", rows))
    result.stages.append(Stage("evaluate", f"{cv.metric} {cv.mean:.4g} +- {cv.std:.4g}"))
    # Each fold's trial exports its model like a sweep trial's (trial.py).
    _check_export(f"{cv.path}/trial_{cv.folds[0].trial_id}/train/model", result)


def _check_steps(run: RunResult, steps: int, result: SmokeResult) -> None:
    step = run.metrics.get("step")
    if step != steps:
        raise SmokeFailed(f"training stopped at step {step}, not {steps}")
    loss = run.metrics.get("loss")
    if not isinstance(loss, float) or not math.isfinite(loss):
        raise SmokeFailed(f"the loss at step {steps} is {loss}")
    result.stages.append(Stage("train", f"step {steps}, loss {loss:.4g}"))


def _check_evaluated(run: RunResult, result: SmokeResult) -> None:
    evals = [e for e in run.history if any(k.startswith("eval_") for k in e)]
    if not evals:
        raise SmokeFailed(f"no evaluation ran by step {LEG_STEPS}")
    metrics = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    result.stages.append(Stage("evaluate", shown))


def _check_export(model_dir: str | None, result: SmokeResult) -> None:
    """The exported model loads with plain torch and gives finite outputs for an example."""
    import torch

    from orchestrator.models import DataInfo, input_example, load_exported

    if model_dir is None or not (Path(model_dir) / "model.json").is_file():
        raise SmokeFailed(f"no model was exported (model directory: {model_dir})")
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    model = load_exported(model_dir, trust_custom_code=True).eval()  # this run's own
    example = torch.as_tensor(input_example(meta["model"], DataInfo(**meta["data"])))
    with torch.no_grad():
        output = model(example)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    if not torch.isfinite(logits).all():
        raise SmokeFailed(f"{model_dir}: the exported model's outputs are not finite")
    result.stages.append(Stage("export", f"{model_dir} (outputs {tuple(logits.shape)})"))
