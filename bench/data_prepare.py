"""Benchmark of distributed data preparation: throughput and the driver's memory at scale.

Run from the repository root (about 10 minutes on a 2-core machine; --quick: 2):

    python bench/data_prepare.py [--quick]

Each preparation runs in a fresh child process that starts its own local Ray (all CPUs) and
calls `orchestrator.data.prepare`, as `orch data prepare` does; the child reports its own peak
RSS (getrusage: the driver alone, not Ray's worker processes) and the manifest. Side by side
in one run:

1. Text: a corpus generated from ../shared/data/tinyshakespeare.txt (repeated to 1x and 10x
   its size). Throughput is the packed tokens per second of the chunk stage (tokenize, pack,
   write; the tokenizer's training timed apart in the manifest) per CPU, against the same
   tokenizer's `encode_batch` on one core (RAYON_NUM_THREADS=1) over the corpus's first 20 MB
   in a child of its own. The tokenizer is trained on a 32 MB sample in both runs
   (`data.tokenizer.sample_mb`), so the sample is the same size at 1x and 10x.
2. Image folder: small generated JPEGs in 100 classes, 1x and 10x images.

Results: bench/results/data_prepare.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = REPO / "bench" / "results" / "data_prepare.json"
FULL = {"text_mb": 100, "chunk_mb": 64, "images": 5_000}
QUICK = {"text_mb": 10, "chunk_mb": 4, "images": 1_000}

CHILD = r"""
import json, resource, sys, time
from orchestrator.data import prepare
from orchestrator.spec import DataSpec
data = DataSpec.model_validate(json.loads(sys.argv[1]))
started = time.monotonic()
prepared = prepare(data)
seconds = time.monotonic() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report = {"seconds": seconds, "driver_peak_rss_mb": peak_mb, "manifest": prepared.manifest}
print(json.dumps(report))
"""

BASELINE = r"""
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read(20 << 20)
lines = [line for line in text.split("\n") if line.strip()]
started = time.perf_counter()
encodings = tok.encode_batch(lines, add_special_tokens=False)
seconds = time.perf_counter() - started
print(sum(len(e.ids) for e in encodings) / seconds)
"""


def child(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def prepare_in_child(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(child(CHILD, json.dumps(data)))


def bench_text(work: Path, mb: int, chunk_mb: int, log: Any) -> dict[str, Any]:
    body = CORPUS.read_bytes()
    runs: dict[str, Any] = {}
    for scale in (1, 10):
        corpus = work / f"corpus-{scale}x.txt"
        with corpus.open("wb") as f:
            for _ in range(max(1, mb * scale * 2**20 // len(body))):
                f.write(body)
        size_mb = corpus.stat().st_size / 2**20
        log(f"text {scale}x: {size_mb:.0f} MB")
        result = prepare_in_child(
            {
                "train": str(corpus),
                "cache_dir": str(work / "cache"),
                "tokenizer": {"kind": "wordpiece", "vocab_size": 30522, "sample_mb": 32},
                "seq_len": 128,
                "chunk_mb": chunk_mb,
            }
        )
        m = result["manifest"]
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["eval"]["tokens"]
        cpus = os.cpu_count() or 1
        runs[f"{scale}x"] = {
            "corpus_mb": round(size_mb, 1),
            "chunks": m["chunks"],
            "tokens": tokens,
            "tokenizer_s": m["timings"]["tokenizer_s"],
            "chunks_s": m["timings"]["chunks_s"],
            "total_s": round(result["seconds"], 1),
            "tokens_per_s_per_cpu": round(tokens / m["timings"]["chunks_s"] / cpus),
            "driver_peak_rss_mb": round(result["driver_peak_rss_mb"]),
        }
        log(f"  {runs[f'{scale}x']}")
        tokenizer = work / "cache" / Path(m["dir"]).name
        runs[f"{scale}x"]["_tokenizer"] = (
            str(next((work / "cache").glob(f"*/{m['dir']}")) / "tokenizer.json")
            if tokenizer
            else ""
        )
    baseline = float(
        child(BASELINE, runs["1x"].pop("_tokenizer"), str(work / "corpus-1x.txt"),
              env={"RAYON_NUM_THREADS": "1"})
    )  # fmt: skip
    runs["10x"].pop("_tokenizer")
    return {
        "runs": runs,
        "encode_batch_one_core_tokens_per_s": round(baseline),
        "ratio_per_cpu_to_encode_batch": round(runs["10x"]["tokens_per_s_per_cpu"] / baseline, 2),
        "driver_rss_10x_to_1x": round(
            runs["10x"]["driver_peak_rss_mb"] / runs["1x"]["driver_peak_rss_mb"], 3
        ),
    }


def bench_images(work: Path, count: int, log: Any) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(256):  # a pool of distinct small JPEGs, written again and again
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out, "JPEG")
        pool.append(out.getvalue())
    runs: dict[str, Any] = {}
    for scale in (1, 10):
        root = work / f"images-{scale}x"
        n = count * scale
        for i in range(n):
            folder = root / f"n{i % 100:08d}"
            if i < 100:
                folder.mkdir(parents=True)
            (folder / f"img_{i:07d}.JPEG").write_bytes(pool[i % len(pool)])
        log(f"images {scale}x: {n}")
        result = prepare_in_child(
            {
                "train": str(root),
                "cache_dir": str(work / "cache-img"),
                "format": "image_folder",
                # several tasks even at 1x, so both scales run the same way
                "shard_rows": count // 4,
            }
        )
        rows = sum(s["rows"] for s in result["manifest"]["splits"].values())
        assert rows == n, rows
        runs[f"{scale}x"] = {
            "images": n,
            "seconds": round(result["seconds"], 1),
            "images_per_s": round(n / result["seconds"]),
            "driver_peak_rss_mb": round(result["driver_peak_rss_mb"]),
        }
        log(f"  {runs[f'{scale}x']}")
    return {
        "runs": runs,
        "driver_rss_10x_to_1x": round(
            runs["10x"]["driver_peak_rss_mb"] / runs["1x"]["driver_peak_rss_mb"], 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["text", "images"])
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - started:6.1f}s {msg}", flush=True)

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "config": cfg,
    }
    with tempfile.TemporaryDirectory(prefix="orch-bench-prep-", dir="/tmp") as tmp:
        if args.only in (None, "text"):
            results["text"] = bench_text(Path(tmp), cfg["text_mb"], cfg["chunk_mb"], log)
        if args.only in (None, "images"):
            results["images"] = bench_images(Path(tmp), cfg["images"], log)
    results["total_s"] = round(time.perf_counter() - started, 1)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
