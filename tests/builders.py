"""The workloads tests and benchmarks run: the shipped laptop YAMLs, made tiny with `--set`.

Each builder loads a file of workloads/local/ through `load_workload` with overrides, as
`orch run FILE --set a.b=c` does, so tests exercise the shipped workloads rather than copies.
Callers add their own `a.b=value` overrides after the builder's; later ones win.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator import WorkloadSpec, load_workload

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "workloads" / "local"
# The real test data: the MNIST t10k idx files and tinyshakespeare.txt.
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = "tinyshakespeare.txt"  # in SHARED_DATA

# 2 layers of 64 on 4000 lines of Shakespeare: 6 steps on 2 CPU workers.
TINY_BERT = [
    "name=bert",
    "model.hidden_size=64",
    "model.max_seq_len=64",
    "model.dropout=0.0",
    "data.format=auto",
    "data.limit=4000",
    "data.seq_len=32",
    "data.tokenizer.vocab_size=500",
    "train.max_steps=6",
    "train.log_every=2",
    "train.eval_every=null",
    "train.eval_batches=2",
    "train.checkpoint_every=null",
    "train.optimizer.lr=2e-3",
    "train.scheduler.warmup_steps=0",
]

# Conv blocks of 16 and 32 channels on MNIST t10k: 6 steps of 32 images on 2 CPU workers.
TINY_CNN = [
    "name=mnist",
    "model.channels=[16, 32]",
    "train.max_steps=6",
    "train.epochs=1",
    "train.micro_batch_size=32",
    "train.log_every=2",
    "train.eval_batches=4",
    "train.checkpoint_every=null",
    "train.optimizer.lr=3e-3",
    "train.scheduler={name: linear, warmup_steps: 0}",
]

# Trials of one quarter-CPU worker: 8 steps of an 8/16-channel CNN, evaluated every 2 steps;
# the learning rate is searched at random, FIFO (no early stopping).
TINY_SWEEP = [
    "name=sweep",
    "model.channels=[8, 16]",
    "train.max_steps=8",
    "train.micro_batch_size=32",
    "train.log_every=2",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.checkpoint_every=null",
    "train.optimizer.lr=3e-3",
    "train.scheduler={name: linear, warmup_steps: 0}",
    "scaling.resources_per_worker={CPU: 0.25}",
    "tune.scheduler={kind: fifo}",
    "tune.space={train.optimizer.lr: {loguniform: [1.0e-5, 1.0e-1]}}",
]


def tiny_bert(data: Path, cache: Path, tmp: Path, *sets: str) -> WorkloadSpec:
    """bert_tiny.yaml made tinier, on tinyshakespeare.txt in `data`."""
    return _load("bert_tiny.yaml", data / SHAKESPEARE, cache, tmp, TINY_BERT, sets)


def tiny_cnn(data: Path, cache: Path, tmp: Path, *sets: str) -> WorkloadSpec:
    """mnist_cnn.yaml made tiny, on the MNIST files in `data`."""
    return _load("mnist_cnn.yaml", data, cache, tmp, TINY_CNN, sets)


def tiny_sweep(data: Path, cache: Path, tmp: Path, *sets: str) -> WorkloadSpec:
    """mnist_cnn_sweep.yaml made tiny, on the MNIST files in `data`."""
    return _load("mnist_cnn_sweep.yaml", data, cache, tmp, TINY_SWEEP, sets)


def quoted(value: object) -> str:
    """`value` as a YAML string for an override, whatever characters a path holds."""
    return json.dumps(str(value))


def _load(
    name: str, train: Path, cache: Path, tmp: Path, tiny: list[str], sets: tuple[str, ...]
) -> WorkloadSpec:
    """The shipped file with its data, cache and runs under the caller's directories.

    No restarts after a failure and no tracking unless a test asks: a failure shows at once,
    and nothing is written outside the test's directories.
    """
    placed = [
        f"data.train={quoted(train)}",
        f"data.cache_dir={quoted(cache)}",
        f"train.storage_path={quoted(tmp / 'runs')}",
        "scaling.max_failures=0",
        "tracking.mlflow.enabled=false",
    ]
    return load_workload(LOCAL / name, [*placed, *tiny, *sets])
