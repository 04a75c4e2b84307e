"""Ray Data's two Parquet datasources, side by side, as a sweep's trials read their shards.

Ray 2.60 reads Parquet through datasource V2 by default, which lists the files in a task of its
own at every execution (each epoch, each evaluation); V1 plans from the given file list once, in
the caller. orch reads through V1 (data/stream.py); as V1's read errors do not name the shard that
failed, orch finds it after a failed read (stream.unreadable_shard). For each, in one run on a
fresh local Ray with
2 CPUs: two actors of a quarter CPU each (two trials at once) each read the prepared MNIST
train shards and take a first batch (a trial's start); then each takes a first batch again (a
new epoch); then a third actor alone (a later trial). Seconds to plan the read and to the first
batch, medians of `--repeats` rounds.

Run from the repository root: `python bench/ray_data_read.py [--repeats N]`. Writes
bench/results/ray_data_read.json. Needs ../shared/data (MNIST t10k files).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the workload builders the tests use
from builders import tiny_cnn  # noqa: E402

MNIST = ROOT.parent / "shared" / "data"


def measure(files: list[str], v2: bool) -> dict[str, float]:
    import ray

    @ray.remote(num_cpus=0.25)
    class Trial:
        def first_batch(self) -> tuple[float, float]:
            import ray.data

            started = time.perf_counter()
            ray.data.DataContext.get_current().use_datasource_v2 = v2
            dataset = ray.data.read_parquet(files)
            planned = time.perf_counter()
            next(iter(dataset.iterator().iter_batches(batch_size=32)))
            return planned - started, time.perf_counter() - planned

    a, b = Trial.remote(), Trial.remote()  # type: ignore[attr-defined]
    together = ray.get([a.first_batch.remote(), b.first_batch.remote()])
    again = ray.get([a.first_batch.remote(), b.first_batch.remote()])
    alone = ray.get(Trial.remote().first_batch.remote())  # type: ignore[attr-defined]
    return {
        "plan_s": statistics.mean(p for p, _ in together),
        "first_batch_two_at_once_s": statistics.mean(f for _, f in together),
        "next_epoch_first_batch_s": statistics.mean(f for _, f in again),
        "new_trial_first_batch_s": alone[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs the MNIST t10k files in {MNIST}")
    import ray

    from orchestrator.data import prepare

    rounds: dict[str, list[dict[str, float]]] = {"v1_orch": [], "v2_ray_default": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec = tiny_cnn(MNIST, Path(tmp) / "cache", Path(tmp))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            files = prepare(spec.data).files("train")
            for _ in range(args.repeats):  # interleaved: the machine's speed drifts
                rounds["v1_orch"].append(measure(files, v2=False))
                rounds["v2_ray_default"].append(measure(files, v2=True))
        finally:
            ray.shutdown()
    report: dict[str, Any] = {
        "setup": f"MNIST train shards ({len(files)} file(s)), actors of 0.25 CPU, local Ray "
        f"2 CPUs, medians of {args.repeats} interleaved rounds",
    }
    for name, measured in rounds.items():
        report[name] = {
            key: round(statistics.median(m[key] for m in measured), 2) for key in measured[0]
        }
    out = ROOT / "bench" / "results" / "ray_data_read.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
