"""Benchmark of orch's data pipeline: streaming memory, and where MLM masking runs.

Run from the repository root:

    python bench/data_pipeline.py           # full run, a few minutes on a 2-core machine
    python bench/data_pipeline.py --quick   # smaller sizes, about two minutes

It prints a short plain-text report and writes the same figures as JSON to
bench/results/data_pipeline.json. Everything runs side by side in one process, and machines
are noisy, so compare the ratios rather than the absolute numbers. Each measurement starts
its own local Ray (`address="local"`, 2 CPUs, no dashboard, a 1 GiB object store) and shuts
it down afterwards; a Ray started elsewhere is never joined or stopped.

1. Preparation (tokenizing, packing and writing text; image folders) is measured by
   bench/data_prepare.py, on the distributed preparation that replaced the driver's loop.
2. Streaming peak memory: synthetic token shards (the schema of `prepare.text_schema`, 128
   tokens a row, 8192 rows a shard as prepare writes them) of N and 10N rows, each streamed
   for one epoch through a real `TorchTrainer` (2 workers at 0.5 CPU, `open_splits` and
   `epoch_batches` with batch 32 and a 2048-row shuffle buffer, a trivial reduction per batch),
   each on a fresh Ray. Every 0.2 s a thread sums the memory of the driver plus every process
   under it whose name starts with "ray::" (Train workers and controller, Data tasks and
   actors, idle workers; not raylet or gcs_server), and every 0.4 s reads the object store's
   usage. Peaks for 1x and 10x and their ratio; the target is a 10x dataset raising the peak
   by no more than 20%, in RSS. RSS counts a shared page (torch's
   libraries, object-store pages) once in every process that maps it, so PSS (shared pages
   split between the processes: the physical memory the job holds) and USS are reported too,
   with each role's own peak (processes grouped by their "ray::" name).
3. Where MLM masking should run, in samples per second consumed on the driver with
   `iter_torch_batches` (through `epoch_batches`, batch 32, shuffle buffer 2048): (a)
   `mask_tokens` on each torch batch in the consumer, as orch's train loop does, versus (b) the
   same `mask_tokens` as a Ray Data `map_batches` stage (numpy in, numpy out, 1024 rows a
   batch) before iteration; plain iteration without masking is the reference. The variants
   take turns, and the best of the repeats counts (throughput figures are best-of-n
   throughout: noise on a shared machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from orchestrator.data.prepare import PreparedData, text_schema
from orchestrator.data.stream import epoch_batches, mask_tokens, open_splits

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = REPO / "bench" / "results" / "data_pipeline.json"

SEQ_LEN = 128
SHARD_ROWS = 8192  # prepare's default data.shard_rows
BATCH = 32
SHUFFLE_BUFFER = 2048
VOCAB = 30522
SPECIAL_IDS = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK], as train_tokenizer numbers them
MASK_ID = 4
MLM_PROBABILITY = 0.15
SAMPLE_EVERY_S = 0.2

FULL = {
    "rows": 40_000,
    "repeats": 3,
    "map_batch_size": 1024,
}
QUICK = {
    "rows": 8_000,
    "repeats": 1,
    "map_batch_size": 1024,
}


# --------------------------------------------------------------------------- Ray
def _start_ray() -> None:
    import ray
    from ray.data import DataContext

    # prepare() sets preserve_order on the process-wide DataContext; start every
    # measurement from a fresh one, quiet.
    ctx = DataContext()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    DataContext._set_current(ctx)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1 << 30,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # Ray's deprecation notices (collate_fn) are re-enabled


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


# --------------------------------------------------------------------------- shards
def write_shards(root: Path, rows: int, seed: int) -> PreparedData:
    """Synthetic packed token rows in prepare's layout, wrapped like prepare() would."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    shards = []
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        ids = rng.integers(len(SPECIAL_IDS), VOCAB, size=n * SEQ_LEN, dtype=np.int32)
        ids[::SEQ_LEN] = 2  # [CLS] ... [SEP], as the packer frames BERT sequences
        ids[SEQ_LEN - 1 :: SEQ_LEN] = 3
        table = pa.Table.from_arrays(
            [
                pa.array(np.arange(start, start + n, dtype=np.int64)),
                pa.FixedSizeListArray.from_arrays(pa.array(ids), SEQ_LEN),
            ],
            schema=text_schema(SEQ_LEN),
        )
        name = f"train/part-{len(shards):05d}.parquet"
        pq.write_table(table, str(root / name))
        shards.append(name)
    manifest = {
        "kind": "text",
        "seq_len": SEQ_LEN,
        "splits": {"train": {"rows": rows, "shards": shards}, "eval": {"rows": 0, "shards": []}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return PreparedData(str(root), pafs.LocalFileSystem(), manifest)


def _disk_mb(prepared: PreparedData) -> float:
    return sum(os.path.getsize(p) for p in prepared.files("train")) / 1e6


# --------------------------------------------------------------------------- 2. memory
class MemorySampler(threading.Thread):
    """Sum the memory of the driver and its "ray::" descendants every `interval` seconds.

    RSS counts a shared page (torch's libraries, the object store's pages) once in every
    process that maps it; PSS splits it between them and USS leaves it out, so PSS sums to
    the physical memory the job holds.
    """

    METRICS = ("rss", "pss", "uss")

    def __init__(self, interval: float = SAMPLE_EVERY_S):
        super().__init__(daemon=True)
        self.interval = interval
        self.driver = psutil.Process()
        self.done = threading.Event()
        self.started = time.perf_counter()
        self.peak: dict[str, Any] = {"rss": 0, "t": 0.0}
        self.peaks = dict.fromkeys(self.METRICS, 0)
        self.peak_procs = 0
        self.peak_store = 0
        self.spilled = 0
        self.samples = 0
        self.role_peak: dict[str, int] = {}
        self._store = self._store_reader()
        self.store_readable = self._store is not None

    @staticmethod
    def _store_reader() -> Callable[[], tuple[int, int]] | None:
        try:
            import ray
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            state = get_state_from_address(ray.get_runtime_context().gcs_address)

            def read() -> tuple[int, int]:
                stats = get_memory_info_reply(state, timeout_seconds=5).store_stats
                return stats.object_store_bytes_used, stats.spilled_bytes_total

            read()
            return read
        except Exception:  # internal API: optional
            return None

    def _job_processes(self) -> list[tuple[str, psutil.Process]]:
        found = [("driver", self.driver)]
        for proc in self.driver.children(recursive=True):
            try:
                cmd = proc.cmdline()
                name = cmd[0] if cmd and cmd[0].startswith("ray::") else proc.name()
            except psutil.Error:
                continue
            if name.startswith("ray::"):  # not raylet or gcs_server: Ray itself, not the job
                found.append((name[5:].split(".")[0].split(" ")[0], proc))
        return found

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = dict.fromkeys(self.METRICS, 0)
        roles: dict[str, int] = {}
        procs = 0
        for role, proc in self._job_processes():
            try:
                mem = proc.memory_full_info()
            except psutil.Error:
                continue
            for metric in self.METRICS:
                out[metric] += getattr(mem, metric)
            roles[role] = roles.get(role, 0) + mem.rss
            procs += role != "driver"
        out.update(procs=procs, roles=roles, t=time.perf_counter() - self.started)
        return out

    def run(self) -> None:
        tick = 0
        while not self.done.is_set():
            s = self.sample()
            self.samples += 1
            if s["rss"] > self.peak["rss"]:
                self.peak = s
            for metric in self.METRICS:
                self.peaks[metric] = max(self.peaks[metric], s[metric])
            self.peak_procs = max(self.peak_procs, s["procs"])
            for role, value in s["roles"].items():
                self.role_peak[role] = max(self.role_peak.get(role, 0), value)
            if self._store is not None and tick % 2 == 0:  # every 0.4 s: a gRPC round trip
                try:
                    used, spilled = self._store()
                    self.peak_store = max(self.peak_store, used)
                    self.spilled = max(self.spilled, spilled)
                except Exception:
                    self._store = None
            tick += 1
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()


def _train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import time

    import ray.train

    from orchestrator.data.stream import epoch_batches

    shard = ray.train.get_dataset_shard("train")
    rows, acc, started = 0, 0.0, time.perf_counter()
    for batch in epoch_batches(shard, config["batch"], 0, 0, shuffle_buffer=config["buffer"]):
        ids = batch["input_ids"]
        acc += float(ids[:, 1:9].float().mean())  # a trivial amount of work per batch
        rows += ids.shape[0]
    return {"rows": rows, "seconds": time.perf_counter() - started, "acc": acc}


def _mb(n: float) -> int:
    return round(n / 2**20)


def _by_size(mapping: dict[str, int]) -> dict[str, int]:
    return {k: _mb(v) for k, v in sorted(mapping.items(), key=lambda kv: -kv[1])}


def measure_streaming(prepared: PreparedData, work: Path, label: str) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _start_ray()
    sampler = None
    try:
        time.sleep(1.0)  # let the start-up workers settle before the idle baseline
        idle = MemorySampler().sample()
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"batch": BATCH, "buffer": SHUFFLE_BUFFER},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"mem-{label}", storage_path=str(work / "ray_results")),
            datasets={"train": open_splits(prepared, seed=0)["train"]},
        )
        sampler = MemorySampler()
        sampler.start()
        result, fit_s = _timed(trainer.fit)
    finally:
        if sampler is not None:
            sampler.stop()
        ray.shutdown()
    rank0 = result.return_value
    peak = sampler.peak
    return {
        "rows": prepared.manifest["splits"]["train"]["rows"],
        "shards": len(prepared.files("train")),
        "decoded_mb": round(prepared.manifest["splits"]["train"]["rows"] * (SEQ_LEN * 4 + 8) / 1e6),
        "disk_mb": round(_disk_mb(prepared), 1),
        "fit_s": round(fit_s, 1),
        "rank0_rows": rank0["rows"],
        "rank0_rows_per_s": round(rank0["rows"] / rank0["seconds"]),
        "samples": sampler.samples,
        "idle_rss_mb": _mb(idle["rss"]),
        "idle_pss_mb": _mb(idle["pss"]),
        "peak_rss_mb": _mb(sampler.peaks["rss"]),
        "peak_pss_mb": _mb(sampler.peaks["pss"]),
        "peak_uss_mb": _mb(sampler.peaks["uss"]),
        "peak_rss_at_s": round(peak["t"], 1),
        "peak_ray_processes": sampler.peak_procs,
        "processes_at_peak": peak["procs"],
        "roles_at_rss_peak_mb": _by_size(peak["roles"]),
        "role_rss_peaks_mb": _by_size(sampler.role_peak),
        "peak_object_store_mb": _mb(sampler.peak_store) if sampler.store_readable else None,
        "spilled_mb": round(sampler.spilled / 2**20, 1),
    }


def bench_streaming(
    small: PreparedData, large: PreparedData, work: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    runs = {}
    for label, prepared in (("1x", small), ("10x", large)):
        runs[label] = measure_streaming(prepared, work, label)
        r = runs[label]
        log(
            f"[2] {label}: {r['rows']} rows, peak {r['peak_rss_mb']} MB RSS "
            f"({r['peak_ray_processes']} ray:: processes), fit {r['fit_s']} s"
        )
    one, ten = runs["1x"], runs["10x"]

    def ratio(key: str) -> float | None:
        return round(ten[key] / one[key], 3) if one[key] and ten[key] is not None else None

    return {
        "runs": runs,
        "ratios_10x_to_1x": {
            "peak_rss": ratio("peak_rss_mb"),
            "peak_pss": ratio("peak_pss_mb"),
            "peak_uss": ratio("peak_uss_mb"),
            "peak_rss_above_idle": round(
                (ten["peak_rss_mb"] - ten["idle_rss_mb"])
                / max(1, one["peak_rss_mb"] - one["idle_rss_mb"]),
                3,
            ),
            "peak_object_store": ratio("peak_object_store_mb"),
            "role_peak_rss": {
                role: round(mb / one["role_rss_peaks_mb"][role], 2)
                for role, mb in ten["role_rss_peaks_mb"].items()
                if one["role_rss_peaks_mb"].get(role)
            },
        },
        "target_ratio_max": 1.2,
    }


# --------------------------------------------------------------------------- 3. masking
def _mask_numpy(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Ray Data stage: the same mask_tokens, on a numpy batch."""
    ids = batch["input_ids"]
    if ids.dtype == object:
        ids = np.stack(ids)
    gen = torch.Generator().manual_seed(int(batch["sample_id"][0]))
    inputs, labels = mask_tokens(
        torch.from_numpy(np.ascontiguousarray(ids)),
        mask_id=MASK_ID,
        vocab_size=VOCAB,
        special_ids=SPECIAL_IDS,
        probability=MLM_PROBABILITY,
        generator=gen,
    )
    return {"sample_id": batch["sample_id"], "input_ids": inputs.numpy(), "labels": labels.numpy()}


def _consume(ds: Any, mask_in_loop: bool) -> tuple[int, float, float]:
    gen = torch.Generator().manual_seed(0)
    rows, masked_s, acc = 0, 0.0, 0
    started = time.perf_counter()
    for batch in epoch_batches(ds, BATCH, 0, 0, shuffle_buffer=SHUFFLE_BUFFER):
        ids = batch["input_ids"]
        if mask_in_loop:
            t = time.perf_counter()
            ids, labels = mask_tokens(
                ids,
                mask_id=MASK_ID,
                vocab_size=VOCAB,
                special_ids=SPECIAL_IDS,
                probability=MLM_PROBABILITY,
                generator=gen,
            )
            masked_s += time.perf_counter() - t
        else:
            labels = batch.get("labels")
        if labels is not None:
            acc += int((labels[:, :8] != -100).sum())
        rows += ids.shape[0]
    return rows, time.perf_counter() - started, masked_s


def bench_masking(
    prepared: PreparedData, repeats: int, map_batch_size: int, log: Callable[[str], None]
) -> dict[str, Any]:
    import ray

    variants = {
        "no_masking": lambda: (open_splits(prepared, seed=0)["train"], False),
        "in_consumer": lambda: (open_splits(prepared, seed=0)["train"], True),
        "map_batches": lambda: (
            open_splits(prepared, seed=0)["train"].map_batches(
                _mask_numpy, batch_format="numpy", batch_size=map_batch_size
            ),
            False,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    mask_s: list[float] = []
    rows = {}
    _start_ray()
    try:
        _consume(open_splits(prepared, seed=0)["train"], False)  # warm-up: workers, page cache
        names = list(variants)
        for rep in range(repeats):
            for name in names[rep % 3 :] + names[: rep % 3]:  # rotate the order: less drift
                ds, in_loop = variants[name]()
                rows[name], seconds, masked = _consume(ds, in_loop)
                times[name].append(seconds)
                if in_loop:
                    mask_s.append(masked)
    finally:
        ray.shutdown()
    rates = {k: rows[k] / min(v) for k, v in times.items()}
    log(
        "[3] samples/s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        + f" ({rows['in_consumer']} rows, best of {repeats})"
    )
    return {
        "rows": rows["in_consumer"],
        "repeats": repeats,
        "map_batch_size": map_batch_size,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "samples_per_s": {k: round(v) for k, v in rates.items()},
        "mask_tokens_s_in_consumer": round(min(mask_s), 3),
        "ratio_map_batches_to_in_consumer": round(rates["map_batches"] / rates["in_consumer"], 3),
        "ratio_in_consumer_to_no_masking": round(rates["in_consumer"] / rates["no_masking"], 3),
    }


# --------------------------------------------------------------------------- report
def report(results: dict[str, Any]) -> str:
    s, m = results["streaming"], results["masking"]
    out = [
        f"orch data pipeline benchmark ({results['mode']}, {results['cpus']} CPUs, "
        f"{results['total_s']:.0f} s)",
        "",
        "1. Preparation (tokenizing, image folders): bench/data_prepare.py",
        "",
        "2. Streaming peak memory: driver + its ray:: processes, sampled every "
        f"{SAMPLE_EVERY_S} s during TorchTrainer.fit (MB)",
    ]
    for label, r in s["runs"].items():
        store = r["peak_object_store_mb"]
        out += [
            f"   {label:>3}: {r['rows']} rows ({r['decoded_mb']} MB decoded, {r['disk_mb']} MB on "
            f"disk, {r['shards']} shards), fit {r['fit_s']} s, {r['rank0_rows_per_s']} rows/s "
            "per worker",
            f"        peak RSS {r['peak_rss_mb']} (at {r['peak_rss_at_s']} s, "
            f"{r['processes_at_peak']} ray:: procs; idle {r['idle_rss_mb']}), "
            f"PSS {r['peak_pss_mb']} (idle {r['idle_pss_mb']}), USS {r['peak_uss_mb']}, "
            f"object store {store if store is not None else 'n/a'}",
            "        largest per-role RSS peaks: "
            + ", ".join(f"{k} {v}" for k, v in list(r["role_rss_peaks_mb"].items())[:6]),
        ]
    q = s["ratios_10x_to_1x"]
    verdict = "OK" if q["peak_rss"] <= s["target_ratio_max"] else "ABOVE TARGET"
    out.append(
        f"   10x/1x: peak RSS x{q['peak_rss']} (target <= x{s['target_ratio_max']}: {verdict}), "
        f"PSS x{q['peak_pss']}, USS x{q['peak_uss']}, RSS above idle "
        f"x{q['peak_rss_above_idle']}, object store "
        + (f"x{q['peak_object_store']}" if q["peak_object_store"] else "n/a")
    )
    out += [
        "",
        f"3. MLM masking placement ({m['rows']} rows, batch {BATCH}, shuffle buffer "
        f"{SHUFFLE_BUFFER}, consumed on the driver, best of {m['repeats']})",
    ]
    for key, label in (
        ("no_masking", "no masking (reference)"),
        ("in_consumer", "mask_tokens per torch batch in consumer"),
        ("map_batches", f"map_batches stage (batch {m['map_batch_size']})"),
    ):
        out.append(f"   {label:<40} {m['samples_per_s'][key]:>8,} samples/s")
    out.append(
        f"   map_batches / in-consumer x{m['ratio_map_batches_to_in_consumer']}; "
        f"in-consumer / no masking x{m['ratio_in_consumer_to_no_masking']}; "
        f"mask_tokens itself took {m['mask_tokens_s_in_consumer']} s of the in-consumer pass"
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 2 minutes)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - started:6.1f}s {msg}", flush=True)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "config": cfg,
    }
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        work = Path(tmp)
        # Streaming first, while the driver holds little memory of its own.
        small = write_shards(work / "small", cfg["rows"], seed=0)
        large = write_shards(work / "large", cfg["rows"] * 10, seed=1)
        results["streaming"] = bench_streaming(small, large, work, log)
        results["masking"] = bench_masking(small, cfg["repeats"], cfg["map_batch_size"], log)
    results["total_s"] = round(time.perf_counter() - started, 1)
    text = report(results)
    results["report"] = text
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(text)
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
