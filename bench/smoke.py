"""`orch run FILE --smoke` of the cluster BERT-base workload: wall time and peak memory.

The issue's goal: under 90 s with the data prepared. Side by side in one run, each as the CLI
runs it (a fresh process), measured twice: cold (the first run generates and prepares the
stand-in data) and with the data prepared:

- workloads/bert_pretrain.yaml --smoke (BERT-base, 110M parameters, ZeRO-2, bf16, 16 GPUs
  shrunk to 2 CPU workers);
- the baseline: workloads/local/bert_tiny.yaml --smoke, the laptop workload (2 layers of 128),
  through the same stages: what the smoke machinery itself costs.

Peak memory is the peak over the orch process and every process under it (Ray's GCS, raylet,
the Train controller and workers), sampled every 0.2 s, summed two ways: RSS, which counts
the pages these processes share (torch's libraries, Ray's object store) once per process, and
PSS, which splits each shared page between its sharers, so that it sums to what the tree
really holds.

    python bench/smoke.py            # writes bench/results/smoke.json
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "bert_pretrain (BERT-base)": "workloads/bert_pretrain.yaml",
    "bert_tiny (baseline)": "workloads/local/bert_tiny.yaml",
}


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that ended since it was listed
            # One read of /proc/PID/smaps_rollup on Linux: cheap enough 5 times a second.
            memory = p.memory_full_info()
            rss += memory.rss
            pss += memory.pss
    return rss, pss


def smoke(workload: str, workdir: Path) -> dict[str, float]:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", workload, "--smoke", "--smoke-dir", workdir],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak_rss = peak_pss = 0
    watched = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not done.is_set():
            try:
                rss, pss = _tree_memory(watched)
            except psutil.Error:
                return
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{workload} --smoke failed ({proc.returncode}):\n{output}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak_rss / 1024**3, 2),
        "peak_pss_gb": round(peak_pss / 1024**3, 2),
    }


def main() -> None:
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, workload in WORKLOADS.items():
            workdir = Path(tmp) / label.split()[0]
            results[label] = {
                "cold": smoke(workload, workdir),
                "data prepared": smoke(workload, workdir),
            }
            shutil.rmtree(workdir, ignore_errors=True)
            print(label, results[label], flush=True)
    out = ROOT / "bench" / "results" / "smoke.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
