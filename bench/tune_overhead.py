"""The overhead of a sweep: its wall time against the training its trials did.

Measured in one run on a fresh local Ray (this machine is noisy: compare the ratios):

1. A sweep of N trials of a small MNIST CNN (FIFO, random learning rates), C at a time. Each
   trial's training time is the sum of its report windows (optimizer steps and the waits for
   data, from the training loop's own clock), so it leaves out what a trial spends starting
   (trial process, Train controller and workers, data pipeline), evaluating and checkpointing.
   The sweep could not finish faster than the trials' training time divided by C; the ratio of
   its wall time to that is its overhead (1.0: none).
2. The same for one `orch run` of one trial's workload, alone on the same Ray: how much of the
   overhead is a Train run's own, whether or not Tune runs it.

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
    from orchestrator.tune import run_sweep

    started = time.monotonic()
    result = run_sweep(spec, tracking=False)
    wall = time.monotonic() - started
    trained, startup = [], []
    for trial_dir in Path(result.path).glob("trial_*"):
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        trained.append(training_seconds(rows))
        first = rows[0]  # time from the trial's start to its first report, less that window
        startup.append(first["time_total_s"] - first["step_time_s"] * first["step"])
    return wall, trained, startup


def run_single(spec: WorkloadSpec) -> tuple[float, float]:
    from orchestrator.run import run_workload

    one = spec.sampled({"name": "bench-single"})
    started = time.monotonic()
    result = run_workload(one, tracking=False)
    return time.monotonic() - started, training_seconds(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
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
            wall, trained, startup = run_sweep_once(spec)
            single_wall, single_trained = run_single(spec)
        finally:
            ray.shutdown()

    ideal = sum(trained) / CONCURRENCY
    figures = {
        "setup": (
            f"MNIST CNN 16/32, {args.trials} trials x {args.steps} steps (batch 32), "
            f"{CONCURRENCY} at a time, 1 worker x 0.25 CPU per trial, FIFO, local Ray 2 CPUs"
        ),
        "sweep_wall_s": round(wall, 1),
        "trial_training_s": [round(t, 2) for t in sorted(trained)],
        "sum_training_s": round(sum(trained), 2),
        "ideal_wall_s_at_concurrency": round(ideal, 2),
        "sweep_overhead_ratio": round(wall / ideal, 2),
        "median_trial_time_to_first_report_s": round(statistics.median(startup), 1),
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
