"""orch's training overhead against a plain PyTorch loop, and the time to the first step.

Measured side by side in one run (this machine is noisy: compare the ratios):

1. Throughput: `orch run` of a tiny BERT masked-LM (2 CPU workers, plain DDP, fp32, the MLM head
   on every token: `train.mlm_predict=all`, as the plain loop computes it) against a
   plain `torch.distributed` (gloo) DDP loop in 2 processes with the same model, batch, precision,
   optimizer and masking, on the same token sequences held in memory; and that same plain loop
   in a bare Ray TorchTrainer (Ray's own cost, without orch). Steady state only: the first
   report window (start-up, compilation of kernels) is left out on all sides. The three are
   interleaved `--throughput-repeats` times (medians, and orch/plain per repeat).
   Then orch's default, the MLM head on the masked tokens only (`train.mlm_predict=masked`).
   Windows of reports that cross an epoch boundary (each epoch is a new Ray Data execution of
   the split) against the median window: the epoch-boundary dip (run enough steps for 2+ epochs).
2. Data wait: the share of orch's step time spent waiting for the next batch (Ray Data stream).
3. Start-up: wall time from launching `orch run` to its first reported training step, with the
   prepared data already cached (the usual case) and from a cold cache; next to it, Ray's own
   floor: launching a bare script whose TorchTrainer (same 2 workers) runs an empty loop, and
   one whose loop takes a first batch of the same shards through Ray Data, read with Ray's
   default Parquet datasource (V2) and with the one orch reads through (V1). The cached case
   and those floors are measured `--repeats` times, interleaved (medians), beside `orch run`
   with Ray Train's own defaults for the settings orch changes (`RAY_DEFAULTS`).

Run from the repository root: `python bench/train_overhead.py [--steps N] [--startup-only]`.
Prints a report and writes bench/results/train_overhead.json (train_startup.json with
--startup-only). Needs ../shared/data/tinyshakespeare.txt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from orchestrator import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the workload builders the tests use
from builders import quoted, tiny_bert  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MICRO, SEQ, WORKERS, LAYERS, HIDDEN = 16, 64, 2, 2, 128


SHUFFLE_BUFFER = 2048  # the spec's default; --shuffle-buffer changes it


def workload(tmp: Path, steps: int, *sets: str) -> WorkloadSpec:
    """The tests' tiny BERT, wider, on the whole corpus: plain DDP, fp32, evaluated at the end."""
    return tiny_bert(
        CORPUS.parent,
        tmp / "cache",
        tmp,
        "name=bench-bert",
        f"model.num_layers={LAYERS}",
        f"model.hidden_size={HIDDEN}",
        "model.max_seq_len=128",
        "data.limit=null",
        f"data.seq_len={SEQ}",
        "data.tokenizer.vocab_size=4000",
        "data.eval_fraction=0.02",
        f"data.shuffle_buffer={SHUFFLE_BUFFER}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={MICRO}",
        "train.log_every=10",
        "train.eval_batches=null",
        "train.optimizer.lr=1e-3",
        f"scaling.num_workers={WORKERS}",
        *sets,
    )


def run_orch(spec: WorkloadSpec, name: str) -> dict:
    """Run orch in-process on a fresh local Ray; return its reports."""
    import ray

    from orchestrator.driver import run_workload

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        result = run_workload(spec, name=name)
    finally:
        ray.shutdown()
    steady = result.history[1:]  # the first window holds start-up
    # A window whose epoch differs from the one before it holds an epoch boundary (a new Ray
    # Data execution of the split); the others are the steady state it is compared with.
    crossing = [e for prev, e in itertools.pairwise(steady) if e["epoch"] != prev["epoch"]]
    within = [e for e in steady if e not in crossing]
    boundary = statistics.mean(e["samples_per_s"] for e in crossing) if crossing else math.nan
    return {
        "samples_per_s": sum(e["samples_per_s"] for e in steady) / len(steady),
        "step_time_s": sum(e["step_time_s"] for e in steady) / len(steady),
        "data_wait_share": sum(e["data_wait_share"] for e in steady) / len(steady),
        "epoch_boundary_ratio": boundary / statistics.median(e["samples_per_s"] for e in within),
        "epochs": steady[-1]["epoch"] + 1,
        "root": str(Path(result.path)),
    }


def prepare_only(spec: WorkloadSpec) -> None:
    import ray

    from orchestrator.data import prepare

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        prepare(spec.data)
    finally:
        ray.shutdown()


def _plain_steps(rank: int, path: str, steps: int, spec: WorkloadSpec) -> list[float]:
    """The plain-PyTorch loop: DDP over the process group already set up, data in memory,
    `spec`'s model, optimizer, schedule and masking; each step's seconds."""
    import numpy as np
    import pyarrow.parquet as pq

    from orchestrator.data.stream import mask_tokens
    from orchestrator.models import DataInfo, build_model
    from orchestrator.train.engines import lr_lambda, make_optimizer

    manifest = json.loads(Path(path, "manifest.json").read_text())
    tok = manifest["tokenizer"]
    shards = f"{path}/{manifest['dir']}" if manifest.get("dir") else path  # the attempt's
    files = [f"{shards}/{s}" for s in manifest["splits"]["train"]["shards"]]
    column = pq.read_table(files, columns=["input_ids"])["input_ids"]
    ids = torch.from_numpy(np.stack(column.to_numpy(zero_copy_only=False))).long()[rank::WORKERS]
    torch.manual_seed(42)
    model = torch.nn.parallel.DistributedDataParallel(
        build_model(spec.model, DataInfo(vocab_size=tok["vocab_size"]))
    )
    optimizer = make_optimizer(spec.train.optimizer, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.train.scheduler, steps))
    gen = torch.Generator().manual_seed(rank)
    specials = [tok["pad_id"], tok["sep_id"], tok["cls_id"], tok["mask_id"]]
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = ids[(step * MICRO) % (len(ids) - MICRO) :][:MICRO]
        inputs, labels = mask_tokens(
            batch,
            mask_id=tok["mask_id"],
            vocab_size=tok["vocab_size"],
            special_ids=specials,
            probability=spec.data.mlm_probability,
            generator=gen,
        )
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def _steady(times: list[float]) -> dict:
    steady = times[10:]  # the first steps hold start-up (allocations, kernel choices)
    step_time = sum(steady) / len(steady)
    return {"step_time_s": step_time, "samples_per_s": MICRO * WORKERS / step_time}


def _baseline_worker(
    rank: int, path: str, steps: int, port: int, out: str, spec: WorkloadSpec
) -> None:
    """One rank of the plain-PyTorch baseline, in a process of its own (no Ray): gloo DDP."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # what Ray gives a worker with half a CPU (OMP_NUM_THREADS=1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    times = _plain_steps(rank, path, steps, spec)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def run_baseline(prepared_root: str, spec: WorkloadSpec, steps: int, tmp: Path) -> dict:
    out = tmp / "baseline.json"
    torch.multiprocessing.spawn(
        _baseline_worker, args=(prepared_root, steps, 29571, str(out), spec), nprocs=WORKERS
    )
    return _steady(json.loads(out.read_text()))


def _ray_floor_loop(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    times = _plain_steps(rank, config["path"], config["steps"], config["spec"])
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(times))


def run_ray_floor(prepared_root: str, spec: WorkloadSpec, steps: int, tmp: Path) -> dict:
    """The same plain loop in a bare Ray TorchTrainer (2 workers of half a CPU, as orch's):
    Ray's own cost, without orch, Ray Data or reports."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp / "ray_floor.json"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        TorchTrainer(
            _ray_floor_loop,
            train_loop_config={"path": prepared_root, "steps": steps, "spec": spec}
            | {"out": str(out)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=WORKERS, resources_per_worker={"CPU": 0.5}
            ),
            run_config=ray.train.RunConfig(storage_path=str(tmp / "floor-runs"), name="loop"),
        ).fit()
    finally:
        ray.shutdown()
    return _steady(json.loads(out.read_text()))


# Ray's own values of the Ray Train settings orch changes (orchestrator/ray_session.py):
# `orch run` with these in its environment starts as it did before orch set them.
RAY_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
}


def time_to_first_step(tmp: Path, cold: bool, env: dict[str, str] | None = None) -> float:
    """Seconds from launching `orch run` to its first reported step (`env`: added to its
    environment)."""
    cache = [f"data.cache_dir={quoted(tmp / f'cold-{time.time_ns()}')}"] if cold else []
    spec = workload(tmp, 3, "train.log_every=1", *cache)
    path = tmp / "first.yaml"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    name = f"first-{time.time_ns()}"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(path), "--name", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp,
        env=os.environ | (env or {}),
    )
    first, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if first is None and re.match(r"step 1/", line.strip()):
            first = time.monotonic() - started
    proc.wait()
    if first is None:
        raise RuntimeError("orch run reported no step:\n" + "".join(lines[-30:]))
    return first


RAY_FLOOR = """
import sys, time
import ray, ray.train
from ray.train.torch import TorchTrainer

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def loop(config):
    with open(config["out"], "w") as f:
        f.write(str(time.time()))


TorchTrainer(loop, train_loop_config={"out": sys.argv[1]},
             scaling_config=ray.train.ScalingConfig(num_workers=2,
                                                    resources_per_worker={"CPU": 0.5}),
             run_config=ray.train.RunConfig(storage_path=sys.argv[2], name="floor")).fit()
ray.shutdown()
"""


RAY_DATA_FLOOR = """
import sys, time
import ray, ray.data, ray.train
from ray.train.torch import TorchTrainer

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def loop(config):
    shard = ray.train.get_dataset_shard("train")
    next(iter(shard.iter_torch_batches(batch_size=16)))
    with open(config["out"], "w") as f:
        f.write(str(time.time()))


ray.data.DataContext.get_current().use_datasource_v2 = sys.argv[4] == "v2"
train = ray.data.read_parquet(sys.argv[3])
TorchTrainer(loop, train_loop_config={"out": sys.argv[1]},
             scaling_config=ray.train.ScalingConfig(num_workers=2,
                                                    resources_per_worker={"CPU": 0.5}),
             run_config=ray.train.RunConfig(storage_path=sys.argv[2], name="floor"),
             datasets={"train": train}).fit()
ray.shutdown()
"""


def ray_floor(tmp: Path, shards: str | None = None, datasource: str = "v2") -> float:
    """Seconds from launching a bare Ray Train script to its loop starting on a worker.

    With `shards`, the loop first takes one batch of those Parquet files through Ray Data, as
    orch's does: Ray's own floor for a first step on streamed data, read through Ray 2.60's
    default Parquet datasource (`datasource` "v2") or the one orch uses ("v1").
    """
    out = tmp / "floor.txt"
    out.unlink(missing_ok=True)
    script, args = (RAY_DATA_FLOOR, [shards, datasource]) if shards else (RAY_FLOOR, [])
    started = time.time()
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp / "floor-runs"), *args],
        check=True,
        capture_output=True,
    )
    return float(out.read_text()) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER)
    parser.add_argument("--skip-startup", action="store_true", help="throughput only")
    parser.add_argument("--startup-only", action="store_true", help="start-up only")
    parser.add_argument("--repeats", type=int, default=2, help="start-up measurements of each")
    parser.add_argument(
        "--throughput-repeats", type=int, default=3, help="throughput runs of each (medians)"
    )
    args = parser.parse_args()
    globals()["SHUFFLE_BUFFER"] = args.shuffle_buffer
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    try:
        spec = workload(tmp, args.steps)
        nan = float("nan")
        orch: dict = {"samples_per_s": nan, "data_wait_share": nan, "epoch_boundary_ratio": nan}
        masked: dict = {"samples_per_s": nan}
        baseline: dict = {"samples_per_s": nan}
        ray_loop: dict = {"samples_per_s": nan}
        ratios: list[float] = []
        if args.startup_only:
            prepare_only(spec)  # the data, cached for the runs below
        else:
            masked = run_orch(spec, "throughput-masked")  # orch's default; prepares the data
        prepared = next((tmp / "cache").iterdir())
        if not args.startup_only:
            # Like for like with the plain loop: the MLM head on every token, as the plain
            # loop computes it. Interleaved repeats, the median of each: the machine's speed
            # drifts by 10% within a run.
            like = workload(tmp, args.steps, "train.mlm_predict=all")
            orchs, rays, plains = [], [], []
            for i in range(args.throughput_repeats):
                orchs.append(run_orch(like, f"throughput-{i}"))
                rays.append(run_ray_floor(str(prepared), spec, args.steps, tmp))
                plains.append(run_baseline(str(prepared), spec, args.steps, tmp))
                ratios.append(orchs[-1]["samples_per_s"] / plains[-1]["samples_per_s"])
            orch = {k: statistics.median(o[k] for o in orchs) for k in orch}
            orch["epochs"] = orchs[0]["epochs"]
            ray_loop = {"samples_per_s": statistics.median(r["samples_per_s"] for r in rays)}
            baseline = {"samples_per_s": statistics.median(p["samples_per_s"] for p in plains)}
        warm = cold = floor = data_floor = data_floor_v1 = defaults = nan
        if not args.skip_startup:
            # Interleaved, the median of each: the machine's speed drifts within a run.
            runs: dict[str, list[float]] = {
                "warm": [],
                "defaults": [],
                "data_floor": [],
                "data_floor_v1": [],
            }
            shards = str(prepared / "train")
            for _ in range(args.repeats):
                runs["data_floor"].append(ray_floor(tmp, shards=shards))
                runs["warm"].append(time_to_first_step(tmp, cold=False))
                runs["data_floor_v1"].append(ray_floor(tmp, shards=shards, datasource="v1"))
                runs["defaults"].append(time_to_first_step(tmp, cold=False, env=RAY_DEFAULTS))
            warm, defaults, data_floor, data_floor_v1 = (
                statistics.median(runs[k])
                for k in ("warm", "defaults", "data_floor", "data_floor_v1")
            )
            cold = time_to_first_step(tmp, cold=True)
            floor = ray_floor(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "setup": f"tiny BERT {LAYERS}x{HIDDEN}, micro batch {MICRO} x "
        f"seq {SEQ}, {WORKERS} CPU workers, DDP fp32, "
        + ("start-up runs of 3 steps" if args.startup_only else f"{args.steps} steps")
        + f", shuffle buffer {SHUFFLE_BUFFER}",
        "orch_samples_per_s": round(orch["samples_per_s"], 1),
        "baseline_samples_per_s": round(baseline["samples_per_s"], 1),
        "throughput_ratio_orch_to_baseline": round(
            orch["samples_per_s"] / baseline["samples_per_s"], 3
        ),
        "throughput_ratio_orch_to_baseline_per_repeat": [round(r, 3) for r in ratios],
        "ray_train_loop_samples_per_s": round(ray_loop["samples_per_s"], 1),
        "throughput_ratio_ray_train_loop_to_baseline": round(
            ray_loop["samples_per_s"] / baseline["samples_per_s"], 3
        ),
        "throughput_ratio_orch_to_ray_train_loop": round(
            orch["samples_per_s"] / ray_loop["samples_per_s"], 3
        ),
        "orch_data_wait_share": round(orch["data_wait_share"], 4),
        "orch_epoch_boundary_window_to_steady": round(orch["epoch_boundary_ratio"], 3),
        "orch_epochs": orch.get("epochs"),
        "orch_mlm_predict_masked_samples_per_s": round(masked["samples_per_s"], 1),
        "masked_head_speedup_vs_orch_all": round(
            masked["samples_per_s"] / orch["samples_per_s"], 3
        ),
        "first_step_s_cached_data": round(warm, 1),
        "first_step_s_cached_data_ray_train_defaults": round(defaults, 1),
        "first_step_s_cold_cache": round(cold, 1),
        "ray_train_floor_s": round(floor, 1),
        "ray_train_with_data_floor_s": round(data_floor, 1),
        "first_step_s_above_ray_data_floor": round(warm - data_floor, 1),
        "first_step_ratio_to_ray_data_floor": round(warm / data_floor, 2),
        "ray_train_with_data_floor_v1_datasource_s": round(data_floor_v1, 1),
        "first_step_ratio_to_ray_data_floor_v1_datasource": round(warm / data_floor_v1, 2),
        "throughput_repeats": args.throughput_repeats,
        "startup_repeats": args.repeats,
    }
    # Only what this run measured; start-up alone goes to a file of its own.
    report = {k: v for k, v in report.items() if not (isinstance(v, float) and math.isnan(v))}
    name = "train_startup.json" if args.startup_only else "train_overhead.json"
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
