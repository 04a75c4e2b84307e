"""orch on one GPU against a plain PyTorch loop on the same GPU, side by side in one run.

Three cases, each from a shipped workload with `--set`-style overrides (one worker):

- `bert_ddp`:   workloads/bert_pretrain.yaml (BERT-base MLM, sequence length 128, bf16) with
                plain DDP (`deepspeed=null`);
- `bert_zero2`: the same with DeepSpeed ZeRO-2, as shipped;
- `resnet50`:   workloads/resnet50_imagenet.yaml (ResNet-50, 224x224, bf16, SGD) on synthetic
                JPEGs in an image folder that orch prepares.

The plain loop trains the model orch builds (`orchestrator.models.build_model`) with orch's
optimizer (`make_optimizer`), batch, precision (autocast over fp32 weights) and GPU settings
(fused AdamW, channels-last images, the MLM head at masked positions only: plain PyTorch
features, each as the spec sets it), on batches already in GPU memory: MLM masks drawn ahead
with orch's `mask_tokens` (15%), images as float tensors. One plain BERT run stands for both
BERT cases: ZeRO-2 on one GPU does the same arithmetic as DDP.

Per case: samples/s, MFU, peak GPU memory (GiB), data-wait share and the ratio to the plain
loop, from orch's reports after the first ones (start-up). MFU and peak memory are orch's own
metrics (`mfu`, `peak_memory_gb`, orchestrator/train/utilization.py); the plain loop's MFU is
orch's times the throughput ratio (the same FLOPs per sample), its peak memory torch's
`max_memory_allocated`, as orch's is. Where orch reports no peak memory, the device memory in
use is polled instead, above what was in use before the run.

orch is given about `--seconds` of training per case: its steps are set from the plain loop's
rate, which is measured first.

    python bench/gpu_throughput.py              # on a GPU: bench/results/gpu_throughput.json
    python bench/gpu_throughput.py --rehearse   # on CPU, toy sizes: ..._rehearsal.json

The GPU check (bench/gpu/check.sh) runs it on the GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator import WorkloadSpec, load_workload

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKLOADS = ROOT / "workloads"

GIB = 1024**3  # orch reports memory in GiB (as `peak_memory_gb`)
WARMUP_REPORTS = 2  # orch's first reports hold start-up: Ray Data's first blocks, autotuning


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each case is: the GPU's sizes, or toy ones for a rehearsal on CPU."""

    bert: tuple[str, ...]  # overrides of bert_pretrain.yaml's model and tokenizer
    bert_batch: int
    corpus_mb: float  # synthetic text; a few epochs' worth at most, so epochs do occur
    resnet: tuple[str, ...]  # overrides of resnet50_imagenet.yaml's model
    resnet_batch: int
    images: int
    image_side: int
    seconds: float  # orch's training time aimed at, per case
    plain_seconds: float  # the plain loop's timed window
    max_steps: int
    scaling: tuple[str, ...]
    ray_cpus: int | None


GPU = Sizes(
    bert=(),  # BERT-base as shipped
    bert_batch=128,
    corpus_mb=24,
    resnet=(),  # ResNet-50 at 224 as shipped
    resnet_batch=128,
    images=8192,
    image_side=224,
    # check.sh gives the bench 240 s: three cases of ~25 s training, each with ~15 s of Ray
    # Train start-up and a final checkpoint, two plain loops, and preparing the data.
    seconds=25,
    plain_seconds=10,
    max_steps=20000,
    scaling=(
        "scaling.use_gpu=true",
        "scaling.resources_per_worker={CPU: 8, GPU: 1}",
    ),
    ray_cpus=None,
)
REHEARSAL = Sizes(
    bert=(
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=2",
        "model.vocab_size=null",  # the tokenizer's
        "data.tokenizer.vocab_size=1000",
    ),
    bert_batch=16,
    corpus_mb=1,
    # ResNet-18 at 64x64 keeps the ImageNet stem; fp32, since a CPU without bf16 instructions
    # emulates bf16 convolutions (under 1 image/s here).
    resnet=(
        "model.depth=18",
        "model.image_size=64",
        "model.num_classes=10",
        "train.precision=fp32",
    ),
    resnet_batch=16,
    images=512,
    image_side=64,
    seconds=12,
    plain_seconds=4,
    max_steps=60,
    # A laptop's worker (workloads/base/local.yaml): Ray Data keeps the other CPU.
    scaling=("scaling.use_gpu=false", "scaling.resources_per_worker={CPU: 0.5}"),
    ray_cpus=2,
)


# --- synthetic data ------------------------------------------------------------------------


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """Lines of made-up words with a Zipf-like frequency, like text to a WordPiece trainer."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20000)]
    weights = 1.0 / (np.arange(len(words)) + 10.0)
    weights /= weights.sum()
    target = int(megabytes * 1e6)
    written = 0
    with path.open("w") as out:
        while written < target:
            picks = rng.choice(len(words), size=200_000, p=weights)
            lengths = rng.integers(8, 24, size=len(picks) // 8)
            chunk, start = [], 0
            for n in lengths:
                chunk.append(" ".join(words[i] for i in picks[start : start + n]).capitalize())
                start += n
            text = ".\n".join(chunk) + ".\n"
            out.write(text)
            written += len(text)


def _write_jpegs(job: tuple[Path, int, int, int, int]) -> None:
    folder, first, count, side, seed = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(first, first + count):
        # Smooth colour fields plus noise: JPEGs of a photo's size, not of white noise.
        small = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
        pixels = np.asarray(small.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = pixels + rng.integers(-12, 13, pixels.shape, dtype=np.int16)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"{i:06d}.jpg", quality=90)


def write_image_folder(root: Path, images: int, side: int, classes: int = 10) -> None:
    """`images` JPEGs of side x side in `classes` class folders (an ImageNet-style layout)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    per_class = images // classes
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for part in range(4):
            count = per_class // 4 + (per_class % 4 if part == 3 else 0)
            jobs.append((folder, part * (per_class // 4), count, side, c * 4 + part))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_jpegs, jobs))


# --- workloads -----------------------------------------------------------------------------


def _placed(tmp: Path, train: Path, batch: int, sizes: Sizes) -> list[str]:
    """Data, caches and runs under `tmp`; one worker; no tracking, restarts or checkpoints."""
    return [
        f"data.train={json.dumps(str(train))}",
        "data.eval=null",
        "data.eval_fraction=0.01",
        f"data.cache_dir={json.dumps(str(tmp / 'cache'))}",
        f"train.storage_path={json.dumps(str(tmp / 'runs'))}",
        f"train.micro_batch_size={batch}",
        "train.global_batch_size=null",  # one worker, no gradient accumulation
        "train.eval_every=null",
        "train.eval_batches=2",
        "train.checkpoint_every=null",
        "train.scheduler.warmup_steps=0",
        "scaling.num_workers=1",
        "scaling.max_failures=0",
        "tracking.mlflow.enabled=false",
        *sizes.scaling,
    ]


def bert_spec(tmp: Path, corpus: Path, sizes: Sizes, *sets: str) -> WorkloadSpec:
    return load_workload(
        WORKLOADS / "bert_pretrain.yaml",
        [*_placed(tmp, corpus, sizes.bert_batch, sizes), "data.seq_len=128", *sizes.bert, *sets],
    )


def resnet_spec(tmp: Path, images: Path, sizes: Sizes, *sets: str) -> WorkloadSpec:
    return load_workload(
        WORKLOADS / "resnet50_imagenet.yaml",
        [*_placed(tmp, images, sizes.resnet_batch, sizes), *sizes.resnet, *sets],
    )


def step_sets(steps: int) -> tuple[str, ...]:
    """Overrides for `steps` optimizer steps, reporting about a dozen times."""
    return (f"train.max_steps={steps}", f"train.log_every={max(1, steps // 12)}")


# --- measuring -----------------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (rehearsal)"


@contextmanager
def device_memory_peak() -> Iterator[dict[str, float]]:
    """Poll the GPU's used memory (every process's) while the block runs; yields a dict whose
    `gb` is, after the block, the peak above what was in use when it started (0 on CPU)."""
    found = {"gb": 0.0}
    if not torch.cuda.is_available():
        yield found
        return
    free, total = torch.cuda.mem_get_info()
    baseline = total - free
    peak = baseline
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            free, total = torch.cuda.mem_get_info()
            peak = max(peak, total - free)
            stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()
        found["gb"] = (peak - baseline) / GIB


def timed_loop(step: Callable[[int], None], seconds: float, warmup: int) -> tuple[int, float]:
    """Run `step` `warmup` times, then for about `seconds`; (timed steps, their seconds).

    The device is synchronized only every few steps, as a real loop would let it run ahead.
    """
    dev = device()
    for i in range(warmup):
        step(i)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    steps = 0
    while time.perf_counter() - started < seconds:
        for _ in range(5):
            step(warmup + steps)
            steps += 1
        sync()
    return steps, time.perf_counter() - started


def _autocast(spec: WorkloadSpec, dev: torch.device) -> torch.autocast:
    """Mixed precision as orch's DDP engine does it: 16-bit autocast over fp32 weights."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.precision)
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


def plain_bert(spec: WorkloadSpec, prepared: Any, sizes: Sizes) -> dict[str, Any]:
    """The plain loop of a BERT case: orch's model, optimizer and masking, data on the GPU."""
    import pyarrow.parquet as pq

    from orchestrator.data.stream import mask_tokens
    from orchestrator.models import DataInfo, build_model
    from orchestrator.train.config import DatasetFacts
    from orchestrator.train.engines import make_optimizer

    dev = device()
    tok = DatasetFacts.from_manifest(prepared.manifest).tokenizer
    assert tok is not None and tok.mask_id is not None
    batch = spec.train.micro_batch_size
    column = pq.read_table(prepared.files("train")[:1], columns=["input_ids"])["input_ids"]
    ids = torch.from_numpy(np.stack(column.to_numpy(zero_copy_only=False))).long()
    pool_size = max(1, min(16, len(ids) // batch))
    gen = torch.Generator().manual_seed(0)
    pool = [
        mask_tokens(
            ids[i * batch : (i + 1) * batch].to(dev),
            mask_id=tok.mask_id,
            vocab_size=tok.vocab_size,
            special_ids=tok.special_ids(),
            probability=spec.data.mlm_probability,
            generator=gen,
        )
        for i in range(pool_size)
    ]
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, DataInfo(vocab_size=tok.vocab_size)).to(dev).train()
    optimizer = make_optimizer(spec.train.optimizer, model, fused=_fused(spec, dev))
    # orch's BERT predicts at the masked positions only (train.mlm_predict): so does this loop.
    masked = getattr(model, "predicts_at_positions", False) and spec.train.mlm_predict == "masked"

    def step(i: int) -> None:
        inputs, labels = pool[i % pool_size]
        with _autocast(spec, dev):
            if masked:
                at = labels != -100
                logits, target = model(inputs, predict_at=at), labels[at]
            else:
                logits, target = model(inputs).logits, labels
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        _update(spec, model, optimizer, loss)

    return _plain_result(step, batch, sizes, warmup=10)


def plain_resnet(spec: WorkloadSpec, sizes: Sizes) -> dict[str, Any]:
    """The plain loop of the ResNet case: orch's model and optimizer, images on the GPU."""
    from orchestrator.models import DataInfo, build_model
    from orchestrator.train.engines import make_optimizer

    dev = device()
    side = getattr(spec.model, "image_size", 224)
    classes = getattr(spec.model, "num_classes", 1000)
    batch = spec.train.micro_batch_size
    # Channels-last on a GPU, as orch does (train.channels_last): cuDNN's fast layout.
    layout = (
        torch.channels_last
        if spec.train.channels_last and dev.type == "cuda"
        else torch.contiguous_format
    )
    gen = torch.Generator().manual_seed(0)
    pool = [
        (
            torch.rand(batch, 3, side, side, generator=gen)
            .to(dev)
            .contiguous(memory_format=layout),
            torch.randint(classes, (batch,), generator=gen).to(dev),
        )
        for _ in range(4)
    ]
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, DataInfo(num_classes=classes, channels=3))
    model = model.to(dev).train().to(memory_format=layout)
    optimizer = make_optimizer(spec.train.optimizer, model, fused=_fused(spec, dev))

    def step(i: int) -> None:
        images, labels = pool[i % len(pool)]
        with _autocast(spec, dev):
            logits = model(images)
        _update(spec, model, optimizer, torch.nn.functional.cross_entropy(logits.float(), labels))

    return _plain_result(step, batch, sizes, warmup=10)


def _fused(spec: WorkloadSpec, dev: torch.device) -> bool:
    """AdamW's fused kernel where orch uses it (train.fused_optimizer, on a GPU)."""
    return spec.train.fused_optimizer and dev.type == "cuda"


def _update(
    spec: WorkloadSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Any
) -> None:
    loss.backward()
    if spec.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _plain_result(
    step: Callable[[int], None], batch: int, sizes: Sizes, warmup: int
) -> dict[str, Any]:
    cuda = device().type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with device_memory_peak() as used:
        steps, seconds = timed_loop(step, sizes.plain_seconds, warmup)
    out: dict[str, Any] = {
        "samples_per_s": steps * batch / seconds,
        "steps": steps,
        "seconds": seconds,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "device_memory_gb": used["gb"] if cuda else None,  # the GPU's in use, polled
    }
    if cuda:
        torch.cuda.empty_cache()  # orch's worker gets the GPU to itself
    return out


def run_orch(spec: WorkloadSpec, name: str) -> tuple[list[dict[str, Any]], float, float]:
    """Run `spec` in orch on this process's Ray: (its training reports, seconds, device GB)."""
    from orchestrator.driver import run_workload

    started = time.perf_counter()
    with device_memory_peak() as used:
        result = run_workload(spec, name=name, tracking=False, export=False)
    reports = [e for e in result.history if "samples_per_s" in e]
    return reports, time.perf_counter() - started, used["gb"]


def summarize(
    reports: list[dict[str, Any]], plain: dict[str, Any], device_gb: float, batch: int
) -> dict[str, Any]:
    """One case's figures from orch's steady reports, beside the plain loop's."""
    steady = reports[WARMUP_REPORTS:] or reports[1:] or reports
    # Each report covers the same number of steps, so the harmonic mean of the rates is the
    # overall rate, and time (1 / rate) weighs the shares.
    weights = [1.0 / e["samples_per_s"] for e in steady]
    rate = len(steady) / sum(weights)
    ratio = rate / plain["samples_per_s"]

    def time_weighted(key: str) -> float | None:
        if not all(key in e for e in steady):
            return None
        return sum(e[key] * w for e, w in zip(steady, weights, strict=True)) / sum(weights)

    mfu = time_weighted("mfu")  # None on a CPU, or a GPU missing from orch's table of peaks
    # The same FLOPs per sample on both sides: MFU scales with throughput.
    plain = {**plain, "mfu": mfu / ratio if mfu is not None else None}
    memory_source: str | None
    if "peak_memory_gb" in reports[-1]:
        memory = max(e.get("peak_memory_gb", 0.0) for e in reports)
        memory_source = "orch's peak_memory_gb (torch max allocated)"
    else:
        memory = device_gb if torch.cuda.is_available() else None
        memory_source = "device memory in use, polled, above the start" if memory else None
    return {
        "gpu": gpu_name(),
        "samples_per_s": rate,
        "mfu": mfu,
        "peak_memory_gb": memory,
        "peak_memory_source": memory_source,
        "data_wait_share": time_weighted("data_wait_share"),
        "ratio_to_plain": ratio,
        "micro_batch_size": batch,
        "steps": reports[-1]["step"] if reports else None,
        "reports_used": len(steady),
        "plain": plain,
    }


def orch_settings(spec: WorkloadSpec) -> dict[str, Any]:
    """The spec's GPU settings a case ran with (orch's defaults unless the workload says)."""
    keys = ("precision", "mlm_predict", "fused_optimizer", "channels_last", "compile", "tf32")
    return {k: getattr(spec.train, k) for k in keys} | {
        "zero_stage": spec.deepspeed.zero_stage if spec.deepspeed else None
    }


def steps_for(plain: dict[str, Any], batch: int, sizes: Sizes) -> int:
    """orch's steps for about `sizes.seconds` of training at the plain loop's rate."""
    steps = int(sizes.seconds * plain["samples_per_s"] / batch)
    return max(24, min(sizes.max_steps, steps))


# --- the run -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rehearse", action="store_true", help="toy sizes on CPU; writes ..._rehearsal.json"
    )
    parser.add_argument(
        "--cases", default="bert_ddp,bert_zero2,resnet50", help="comma-separated case names"
    )
    parser.add_argument("--seconds", type=float, help="orch's training time per case")
    parser.add_argument("--out", type=Path, help="results file (default: by mode)")
    args = parser.parse_args()
    sizes = REHEARSAL if args.rehearse else GPU
    if args.seconds:
        sizes = dataclasses.replace(sizes, seconds=args.seconds)
    if not args.rehearse and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --rehearse for the CPU rehearsal")
    out = args.out or RESULTS / (
        "gpu_throughput_rehearsal.json" if args.rehearse else "gpu_throughput.json"
    )
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="orch-gpu-bench-"))
    try:
        run(cases, sizes, tmp, out, args.rehearse)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(cases: list[str], sizes: Sizes, tmp: Path, out: Path, rehearse: bool) -> None:
    import deepspeed
    import ray
    import transformers

    from orchestrator.data import prepare
    from orchestrator.ray_session import LOCAL_TRAIN_SETTINGS, TRAIN_SETTINGS

    results: dict[str, Any] = {
        "gpu": gpu_name(),
        "rehearsal": rehearse,
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "sizes": dataclasses.asdict(sizes),
    }

    def save() -> None:  # after each case, so a run cut short keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}", flush=True)

    # Ray Train reads orch's settings from the environment of `ray.init` (as `orch run` does).
    for key, value in (TRAIN_SETTINGS | LOCAL_TRAIN_SETTINGS).items():
        os.environ.setdefault(key, value)
    ray.init(
        num_cpus=sizes.ray_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        if any(c.startswith("bert") for c in cases):
            started = time.perf_counter()
            corpus = tmp / "corpus.txt"
            write_corpus(corpus, sizes.corpus_mb)
            spec = bert_spec(tmp, corpus, sizes)
            prepared = prepare(spec.data)  # orch's runs find it in the cache
            print(f"bert data: {time.perf_counter() - started:.0f} s", flush=True)
            plain = plain_bert(spec, prepared, sizes)
            print(f"bert plain: {plain['samples_per_s']:.1f} samples/s", flush=True)
            steps = steps_for(plain, sizes.bert_batch, sizes)
            for case, sets in (("bert_ddp", ("deepspeed=null",)), ("bert_zero2", ())):
                if case in cases:
                    case_spec = bert_spec(tmp, corpus, sizes, *sets, *step_sets(steps))
                    reports, seconds, device_gb = run_orch(case_spec, case.replace("_", "-"))
                    results[case] = summarize(reports, plain, device_gb, sizes.bert_batch)
                    results[case]["orch_seconds"] = seconds
                    results[case]["orch_settings"] = orch_settings(case_spec)
                    print(f"{case}: {_line(results[case])}", flush=True)
                    save()
        if "resnet50" in cases:
            started = time.perf_counter()
            folder = tmp / "images"
            write_image_folder(folder, sizes.images, sizes.image_side)
            spec = resnet_spec(tmp, folder, sizes)
            prepare(spec.data)
            print(f"resnet data: {time.perf_counter() - started:.0f} s", flush=True)
            plain = plain_resnet(spec, sizes)
            print(f"resnet plain: {plain['samples_per_s']:.1f} samples/s", flush=True)
            steps = steps_for(plain, sizes.resnet_batch, sizes)
            case_spec = resnet_spec(tmp, folder, sizes, *step_sets(steps))
            reports, seconds, device_gb = run_orch(case_spec, "resnet50")
            results["resnet50"] = summarize(reports, plain, device_gb, sizes.resnet_batch)
            results["resnet50"]["orch_seconds"] = seconds
            results["resnet50"]["orch_settings"] = orch_settings(case_spec)
            print(f"resnet50: {_line(results['resnet50'])}", flush=True)
            save()
    finally:
        ray.shutdown()
    save()


def _line(case: dict[str, Any]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return (
        f"{case['samples_per_s']:.1f} samples/s (plain {case['plain']['samples_per_s']:.1f}, "
        f"ratio {case['ratio_to_plain']:.2f}), MFU {fmt(case['mfu'], '.1%')}, "
        f"peak memory {fmt(case['peak_memory_gb'], '.1f')} GB, "
        f"data wait {fmt(case['data_wait_share'], '.1%')}"
    )


if __name__ == "__main__":
    main()
