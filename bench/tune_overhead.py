"""The overhead of a sweep: its wall time against the training its trials did.

Measured in one run on a fresh local Ray (this machine is noisy: compare the ratios):

1. A sweep of N trials of a small MNIST CNN (FIFO, random learning rates), C at a time. Each
   trial's training time is the sum of its report windows (optimizer steps and the waits for
   data, from the training loop's own clock), so it leaves out what a trial spends starting
   (trial process, data pipeline, model), evaluating and checkpointing. The sweep could not
   finish faster than the trials' training time divided by C; the ratio of its wall time to
   that is its overhead (1.0: none).
2. The time to a trial's first report, as the sweep's driver sees it: from the Tuner's start to
   the first report of each trial that starts with the sweep (C of them), less the steps'
   compute in that first report window (its waits for data count as start-up). Beside it, in
   the same Ray and with the same resources, the same for trials of an empty Tune function
   (it reports at once: what Tune itself costs a trial), and for trials that import torch and
   take one AdamW step on a one-layer model before they report: the floor of any PyTorch
   trial (a fresh process imports torch, and torch's first optimizer imports torch._dynamo).
3. The same for one `orch run` of one trial's workload, alone on the same Ray: a Ray Train run's
   own overhead, for comparison.

Run from the repository root: `python bench/tune_overhead.py [--trials N] [--steps S]`. Prints
a report and writes bench/results/tune_overhead.json. Needs ../shared/data (MNIST t10k files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the workload builders the tests use
from builders import tiny_sweep  # noqa: E402

MNIST = ROOT.parent / "shared" / "data"
CONCURRENCY = 2


def workload(tmp: Path, trials: int, steps: int) -> WorkloadSpec:
    """The tests' tiny sweep with 16/32 channels, random learning rates, FIFO."""
    return tiny_sweep(
        MNIST,
        tmp / "cache",
        tmp,
        "name=bench-sweep",
        "model.channels=[16, 32]",
        f"train.max_steps={steps}",
        "train.log_every=10",
        "train.eval_every=null",
        "train.eval_batches=4",
        "train.optimizer.lr=1e-3",
        # `loss` is in every report, so every window reaches Tune and is counted here.
        "tune.metric=loss",
        f"tune.num_samples={trials}",
        f"tune.max_concurrent_trials={CONCURRENCY}",
        "tune.space={train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}",
    )


def training_seconds(reports: list[dict[str, Any]]) -> float:
    """Optimizer-step time of one run: each report window's step time x its steps."""
    total, previous = 0.0, 0
    for report in sorted(reports, key=lambda r: r["step"]):
        total += report["step_time_s"] * (report["step"] - previous)
        previous = report["step"]
    return total


def run_sweep_once(spec: WorkloadSpec) -> tuple[float, list[float], list[float]]:
    """The sweep's wall time, each trial's training time, and the time to the first report of
    each trial of the first wave (those that start with the sweep) less its training."""
    from orchestrator.sweeps import run_sweep

    fit_started = 0.0
    starts: list[str] = []  # trial ids in the order they started
    first_report: dict[str, float] = {}

    def log(line: str) -> None:
        nonlocal fit_started
        words = line.split()
        if words[:1] == ["starting"]:  # "starting sweep ...", just before the Tuner starts
            fit_started = time.monotonic()
        elif len(words) >= 3 and words[0] == "trial" and words[2] == "started:":
            starts.append(words[1])
        elif len(words) >= 3 and words[0] == "trial" and words[2] == "step":
            first_report.setdefault(words[1], time.monotonic())

    started = time.monotonic()
    result = run_sweep(spec, tracking=False, log=log)
    wall = time.monotonic() - started
    trained, startup = [], []
    for trial_dir in Path(result.path).glob("trial_*"):
        trial = trial_dir.name.removeprefix("trial_")
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        trained.append(training_seconds(rows))
        if trial in starts[:CONCURRENCY]:
            # Less the steps' compute in the first report's window; its waits for data (the
            # first batch's among them) are start-up too.
            first = rows[0]
            window = (first["step_time_s"] - first["data_wait_s"]) * first["step"]
            startup.append(first_report[trial] - fit_started - window)
    return wall, trained, startup


def empty_trials(trials: int, cpu: float, torch_step: bool) -> list[float]:
    """The same for Tune function trials that report at once, or after one torch step (same
    resources, same Ray)."""
    from ray import tune

    starts: list[str] = []
    first_report: dict[str, float] = {}

    class Clock(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            starts.append(trial.trial_id)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
            first_report.setdefault(trial.trial_id, time.monotonic())

    def empty(config: dict[str, Any]) -> None:
        if torch_step:
            import torch

            model = torch.nn.Linear(8, 1)
            optimizer = torch.optim.AdamW(model.parameters())
            model(torch.ones(4, 8)).sum().backward()
            optimizer.step()
        tune.report({"loss": 0.0})

    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(
            tune.with_resources(empty, tune.PlacementGroupFactory([{"CPU": cpu}])),
            param_space={"x": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=CONCURRENCY, reuse_actors=False),
            run_config=tune.RunConfig(storage_path=tmp, callbacks=[Clock()], verbose=0),
        )
        fit_started = time.monotonic()
        tuner.fit()
    return [first_report[t] - fit_started for t in starts[:CONCURRENCY]]


def trial_cpu(spec: WorkloadSpec) -> float:
    from orchestrator.sweeps.trial import trial_resources

    return trial_resources(spec)["CPU"]


def run_single(spec: WorkloadSpec) -> tuple[float, float]:
    from orchestrator.driver import run_workload

    one = spec.sampled({"name": "bench-single"})
    started = time.monotonic()
    result = run_workload(one, tracking=False)
    return time.monotonic() - started, training_seconds(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    # 3000 steps: at least 30 s of training per trial here, so that start-up is not all there is.
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs the MNIST t10k files in {MNIST}")

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        spec = workload(Path(tmp), args.trials, args.steps)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            from orchestrator.data import prepare

            prepare(spec.data)  # outside both timings: the sweep and the run share it
            empty = empty_trials(args.trials, trial_cpu(spec), torch_step=False)
            torch_floor = empty_trials(args.trials, trial_cpu(spec), torch_step=True)
            wall, trained, startup = run_sweep_once(spec)
            single_wall, single_trained = run_single(spec)
        finally:
            ray.shutdown()

    ideal = sum(trained) / CONCURRENCY
    figures = {
        "setup": (
            f"MNIST CNN 16/32, {args.trials} trials x {args.steps} steps (batch 32), "
            f"{CONCURRENCY} at a time, 1 worker x {trial_cpu(spec):g} CPU per trial, FIFO, "
            "local Ray 2 CPUs"
        ),
        "sweep_wall_s": round(wall, 1),
        "trial_training_s": [round(t, 2) for t in sorted(trained)],
        "sum_training_s": round(sum(trained), 2),
        "ideal_wall_s_at_concurrency": round(ideal, 2),
        "sweep_overhead_ratio": round(wall / ideal, 2),
        "median_trial_time_to_first_report_s": round(statistics.median(startup), 1),
        "median_empty_trial_time_to_first_report_s": round(statistics.median(empty), 1),
        "first_report_ratio_to_empty_trial": round(
            statistics.median(startup) / statistics.median(empty), 2
        ),
        "median_torch_step_trial_time_to_first_report_s": round(statistics.median(torch_floor), 1),
        "first_report_ratio_to_torch_step_trial": round(
            statistics.median(startup) / statistics.median(torch_floor), 2
        ),
        "single_run_wall_s": round(single_wall, 1),
        "single_run_training_s": round(single_trained, 2),
        "single_run_overhead_ratio": round(single_wall / single_trained, 2),
    }
    out = ROOT / "bench" / "results" / "tune_overhead.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
