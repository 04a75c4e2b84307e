"""The rules that shrink any workload to a smoke run on this machine (`orch run --smoke`).

A smoke run keeps what decides whether a workload works (the model kind and size, the data
format and tokenizer, the DeepSpeed stage, the precision where this CPU has it, the sweep's space
and scheduler) and shrinks what only decides how long it takes:

- scaling: at most 2 CPU workers of half a CPU each (1 per sweep trial, so two trials fit
  beside Ray Data), no GPU, placement PACK (one machine);
- precision: fp16, which needs a GPU, becomes bf16; bf16 stays where this CPU has bf16
  instructions (AVX-512 BF16, AMX, Arm's BF16) and becomes fp32 where it has not: emulated, a
  BERT-base step runs about 28x slower than in fp32 (bench/cpu_bf16.py), and its smoke run
  takes 10 minutes instead of 2; fp32 stays;
- data: at most `SAMPLE_RECORDS` source records, sequences of at most `MAX_SEQ_LEN` tokens, a
  small shuffle buffer; a remote source that does not answer within `PROBE_TIMEOUT_S` is
  replaced by generated data of the same kind (text or images), and the change says so;
- model: kept, unless its states would not fit in half of this machine's free memory; then
  the same kind, scaled down (a custom model cannot be: the error says what to set);
- training: `SMOKE_STEPS` steps of at most `MAX_MICRO_BATCH` samples (gradient accumulation
  kept, at 2 micro-steps), evaluated and checkpointed every `LEG_STEPS`, reporting every step;
- sweep: `SWEEP_TRIALS` trials, schedulers allowed to act after one report;
- cross-validation: `CV_FOLDS` folds (one trial each, like a sweep's), each evaluated once on
  its whole fold;
- storage, data cache and MLflow: under the smoke directory, never the workload's own;
  tracking only when asked, into a store there.

Every rule that changes a field records a `Change`, so the run can say exactly how it differs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import RunError
from orchestrator.masking import mask
from orchestrator.spec import DataSpec, WorkloadSpec

__all__ = [
    "LEG_STEPS",
    "SMOKE_STEPS",
    "Change",
    "Generated",
    "Probes",
    "Shrinking",
    "Shrunk",
    "shrink",
]

SMOKE_STEPS = 3  # trained in two legs: the second resumes from the first one's checkpoint
LEG_STEPS = 2
SAMPLE_RECORDS = 2000
MAX_SEQ_LEN = 128
MAX_MICRO_BATCH = 2
WORKER_CPU = 0.5
SWEEP_TRIALS = 2
CV_FOLDS = 2
PROBE_TIMEOUT_S = 15.0
SHUFFLE_BUFFER = 256
# Scaled-down shapes, used only when a model's states do not fit this machine.
_SMALL_TRANSFORMER = {
    "hidden_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": None,
}


@dataclass(frozen=True)
class Change:
    field: str
    before: Any
    after: Any
    why: str

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.before)} -> {_show(self.after)} ({self.why})"


@dataclass(frozen=True)
class Generated:
    """A source that could not be reached and was replaced by generated data."""

    uri: str
    why: str

    def __str__(self) -> str:
        why = self.why if len(self.why) <= 160 else self.why[:157] + "..."
        return mask(f"{self.uri} is unreachable ({why})")


@dataclass(frozen=True)
class Shrunk:
    spec: WorkloadSpec
    changes: list[Change]
    generated: list[Generated]  # said loudly: the run trains on stand-in data


def shrink(
    spec: WorkloadSpec,
    workdir: Path,
    *,
    track: bool = False,
    available_memory: float | None = None,
    cpu_bf16: bool | None = None,
) -> Shrunk:
    """`spec` shrunk to a smoke run whose files all live under `workdir`.

    `available_memory` and `cpu_bf16` stand in for this machine's (free bytes; whether its CPU
    computes in bf16 natively) where given.
    """
    return Shrinking(
        spec, workdir, track=track, available_memory=available_memory, cpu_bf16=cpu_bf16
    ).finish()


class Shrinking:
    """A shrink in two halves, so that the caller can start Ray in between: everything but the
    data is decided (and refused, when it cannot be) at once; remote sources are probed in the
    background meanwhile, and `finish` replaces the unreachable ones."""

    def __init__(
        self,
        spec: WorkloadSpec,
        workdir: Path,
        *,
        track: bool = False,
        available_memory: float | None = None,
        cpu_bf16: bool | None = None,
    ):
        self._spec, self._workdir = spec, workdir
        # Listing a bucket can take seconds; sizing the model meanwhile imports its library.
        self._probes = Probes(spec.data)
        self._edit = edit = _Edit(spec.model_dump(mode="python"))
        sweep = spec.tune is not None or spec.cv is not None  # a cv's folds are sweep trials
        _scaling(edit, sweep)
        _precision(edit, cpu_has_bf16() if cpu_bf16 is None else cpu_bf16)
        _training(edit, workdir, sweep)
        _tune(edit)
        _cv(edit)
        _tracking(edit, workdir, track)
        _fit_model(edit, _validate(edit), available_memory)
        _check_local_sources(spec.data)

    def finish(self) -> Shrunk:
        generated = _data(self._edit, self._spec, self._workdir, self._probes.unreachable())
        return Shrunk(_validate(self._edit), self._edit.changes, generated)


def _check_local_sources(data: DataSpec) -> None:
    """A missing local path is the user's to fix (never replaced by generated data)."""
    from orchestrator.data.sources import find_source

    for uri in (data.train, data.eval):
        if uri is not None and ("://" not in uri or uri.startswith("file://")):
            find_source(uri)  # DataError naming the path


class _Edit:
    """The spec as a plain dict, and every change made to it, by dotted path."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.changes: list[Change] = []

    def get(self, path: str) -> Any:
        node: Any = self.data
        for key in path.split("."):
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    def set(self, path: str, value: Any, why: str) -> None:
        before = self.get(path)
        if before == value:
            return
        *parents, last = path.split(".")
        node = self.data
        for key in parents:
            node = node[key]
        node[last] = value
        self.changes.append(Change(path, before, value, why))


def _scaling(edit: _Edit, sweep: bool) -> None:
    workers = 1 if sweep else min(edit.get("scaling.num_workers"), 2)
    why = "one CPU worker per sweep trial" if sweep else "2 CPU workers at most"
    edit.set("scaling.num_workers", workers, why)
    edit.set("scaling.use_gpu", False, "no GPU in a smoke run")
    if edit.get("train.compile"):
        edit.set("train.compile", False, "torch.compile is a GPU setting")
    edit.set(
        "scaling.resources_per_worker",
        {"CPU": WORKER_CPU},
        f"{WORKER_CPU:g} CPU each, so Ray Data keeps a CPU to stream with",
    )
    edit.set("scaling.placement_strategy", "PACK", "one machine")
    edit.set("scaling.max_failures", min(edit.get("scaling.max_failures"), 1), "fail fast")


def _precision(edit: _Edit, cpu_bf16: bool) -> None:
    precision = edit.get("train.precision")
    if precision == "fp16" and cpu_bf16:
        edit.set("train.precision", "bf16", "fp16 needs a GPU; bf16 is its CPU equivalent")
    elif precision == "fp16":
        edit.set("train.precision", "fp32", "fp16 needs a GPU, and this CPU has no bf16 either")
    elif precision == "bf16" and not cpu_bf16:
        # Emulated bf16 changes nothing a smoke run checks but its length.
        edit.set(
            "train.precision",
            "fp32",
            "this CPU has no bf16 instructions: emulated, bf16 runs ~28x slower than fp32",
        )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively, as oneDNN (torch's CPU kernels) finds it."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # a torch built without oneDNN: its bf16 is emulated too
        return False


def _training(edit: _Edit, workdir: Path, sweep: bool) -> None:
    micro = min(edit.get("train.micro_batch_size"), MAX_MICRO_BATCH)
    workers = edit.get("scaling.num_workers")
    before = edit.data["train"]
    accumulates = (before["global_batch_size"] or 0) > before["micro_batch_size"] * (
        edit.data["scaling"]["num_workers"]
    )
    edit.set("train.micro_batch_size", micro, f"at most {MAX_MICRO_BATCH} samples per step")
    edit.set(
        "train.global_batch_size",
        micro * workers * 2 if accumulates else None,
        "gradient accumulation kept, at 2 micro-steps" if accumulates else "no accumulation",
    )
    steps = f"{SMOKE_STEPS} steps" if sweep else f"{LEG_STEPS} steps, then resumed to {SMOKE_STEPS}"
    edit.set("train.max_steps", SMOKE_STEPS, steps)
    for key in ("eval_every", "checkpoint_every"):
        edit.set(f"train.{key}", LEG_STEPS, "in each leg")
    edit.set("train.eval_batches", 2, "a short evaluation")
    edit.set("train.keep_checkpoints", 2, "the last two checkpoints")
    edit.set("train.log_every", 1, "every step reported")
    warmup = edit.get("train.scheduler.warmup_steps")
    edit.set("train.scheduler.warmup_steps", min(warmup, 1), "the schedule runs within the smoke")
    edit.set("train.storage_path", str(workdir / "runs"), "never the workload's own storage")


def _data(
    edit: _Edit, spec: WorkloadSpec, workdir: Path, unreachable: dict[str, str]
) -> list[Generated]:
    data = spec.data
    edit.set("data.cache_dir", str(workdir / "data"), "never the workload's own cache")
    limit = min(data.limit or SAMPLE_RECORDS, SAMPLE_RECORDS)
    edit.set("data.limit", limit, "a bounded sample of the source")
    edit.set("data.seq_len", min(data.seq_len, MAX_SEQ_LEN), "short sequences")
    edit.set(
        "data.shuffle_buffer", min(data.shuffle_buffer, SHUFFLE_BUFFER), "a small shuffle buffer"
    )
    generated = []
    for split, why in unreachable.items():
        uri = getattr(data, split)
        path, fmt = _generate(spec, workdir / "generated", split)
        edit.set(f"data.{split}", str(path), "GENERATED stand-in: the source is unreachable")
        edit.set("data.format", fmt, "the generated data's format")
        generated.append(Generated(uri, why))
    return generated


class Probes:
    """Whether remote sources can be listed from here, each probed in a daemon thread.

    A local path is never probed nor replaced: a missing one is the user's to fix, and the run
    says so. A store behind a black-holed network can take minutes to give up; a probe that
    has not answered by the deadline counts as unreachable and is left behind, not waited for.
    """

    def __init__(self, data: DataSpec):
        splits = {s: uri for s in ("train", "eval") if (uri := getattr(data, s))}
        self._answers: dict[str, str | None] = {}
        self._remote = [s for s, u in splits.items() if "://" in u and not u.startswith("file")]
        self._threads = [
            threading.Thread(
                target=self._probe, args=(split, splits[split]), daemon=True, name="orch-probe"
            )
            for split in self._remote
        ]
        for thread in self._threads:
            thread.start()
        self._deadline = time.monotonic() + PROBE_TIMEOUT_S

    def _probe(self, split: str, uri: str) -> None:
        from orchestrator.data.sources import DataError, find_source

        try:
            find_source(uri)
            self._answers[split] = None
        except DataError as exc:
            self._answers[split] = str(exc).removeprefix(f"{uri}: ")
        except Exception as exc:  # any failure to list a remote store means: not reachable
            self._answers[split] = f"{type(exc).__name__}: {exc}"

    def unreachable(self) -> dict[str, str]:
        """split -> why, for each remote source that could not be listed."""
        for thread in self._threads:
            thread.join(max(0.0, self._deadline - time.monotonic()))
        late = f"no answer in {PROBE_TIMEOUT_S:g} s"
        return {
            split: why
            for split in self._remote
            if (why := self._answers.get(split, late)) is not None
        }


def _generate(spec: WorkloadSpec, folder: Path, split: str) -> tuple[Path, str]:
    from orchestrator.smoketest.samples import image_folder, text_corpus

    model = spec.model
    seed = spec.train.seed + (split == "eval")
    if model.inputs == "tokens":
        jsonl = spec.data.format == "jsonl"
        path = folder / f"{spec.name}-{split}.{'jsonl' if jsonl else 'txt'}"
        column = spec.data.text_column
        return text_corpus(path, jsonl=jsonl, text_column=column, seed=seed), (
            "jsonl" if jsonl else "text"
        )
    if model.inputs == "images":
        size = int(getattr(model, "image_size", 32))
        channels = int(getattr(model, "in_channels", 3))
        root = folder / f"{spec.name}-{split}"
        return image_folder(root, channels=channels, size=size, seed=seed), "image_folder"
    raise RunError(
        f"data.{split}: {getattr(spec.data, split)} is unreachable and orch cannot tell what "
        f"data a {model.kind} model takes; give a local sample with --set data.{split}=PATH"
    )


def _tune(edit: _Edit) -> None:
    if edit.get("tune") is None:
        return
    space = edit.get("tune.space")
    grids = [path for path, domain in space.items() if domain.get("grid") is not None]
    if grids:
        # num_samples runs per grid point: two points of the first grid, one of the others.
        trimmed = {
            path: (
                {**domain, "grid": domain["grid"][: 2 if path == grids[0] else 1]}
                if domain.get("grid") is not None
                else domain
            )
            for path, domain in space.items()
        }
        edit.set("tune.space", trimmed, f"{SWEEP_TRIALS} grid points")
        edit.set("tune.num_samples", 1, "once per grid point")
    else:
        edit.set("tune.num_samples", SWEEP_TRIALS, f"{SWEEP_TRIALS} trials")
    edit.set("tune.max_concurrent_trials", None, "as many as fit here")
    edit.set("tune.time_budget_s", None, "the smoke is short anyway")
    scheduler = edit.get("tune.scheduler.kind")
    if scheduler == "asha":
        edit.set("tune.scheduler.grace_period", 1, "ASHA may stop a trial after one evaluation")
    if scheduler == "pbt":
        edit.set("tune.scheduler.perturbation_interval", 1, "PBT acts after one checkpoint")


def _cv(edit: _Edit) -> None:
    if edit.get("cv") is None:
        return
    fold = edit.get("cv.fold")
    edit.set("cv.folds", CV_FOLDS, f"{CV_FOLDS} folds")
    if fold is not None:
        edit.set("cv.fold", min(fold, CV_FOLDS - 1), f"one of the {CV_FOLDS} folds")
    edit.set("cv.max_concurrent_folds", None, "as many as fit here")
    # Each fold's evaluation covers its whole fold (cv refuses eval_batches): once is enough.
    edit.set("train.eval_batches", None, "a cross-validation evaluates whole folds")
    edit.set("train.eval_every", None, "each fold evaluated once, at its end")


def _tracking(edit: _Edit, workdir: Path, track: bool) -> None:
    if not edit.get("tracking.mlflow.enabled"):
        return
    if not track:
        edit.set("tracking.mlflow.enabled", False, "not tracked unless asked (--track)")
        return
    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    edit.set("tracking.mlflow.tracking_uri", uri, "a local store, never the workload's server")


def _validate(edit: _Edit) -> WorkloadSpec:
    from pydantic import ValidationError

    try:
        return WorkloadSpec.model_validate(edit.data)
    except ValidationError as exc:  # a rule above broke the spec: orch's bug, said plainly
        raise RunError(f"the smoke rules made an invalid workload: {exc}") from None


# Feature columns assumed when sizing a tabular model before its data is read: wider than most
# tables, so a model that fits with it fits with the real one.
_SIZING_FEATURES = 1024


def _fit_model(edit: _Edit, spec: WorkloadSpec, available: float | None) -> None:
    """The model, scaled down to the same kind if its states would not fit in memory here."""
    import psutil

    from orchestrator.model_zoo import DataInfo, ModelError
    from orchestrator.plan import PlanError, check_memory

    available = available if available is not None else psutil.virtual_memory().available
    model = spec.model
    # The data is not prepared yet: classes, features and padding stand in for what the data
    # will say, only to size the model (they change nothing but a head or a first layer).
    info = DataInfo(
        vocab_size=getattr(model, "vocab_size", None) or spec.data.tokenizer.vocab_size,
        num_classes=getattr(model, "num_classes", None) or 2,
        channels=getattr(model, "in_channels", None),
        num_features=_SIZING_FEATURES,
        pad_id=0,
        seq_len=spec.data.seq_len,
    )
    fits = spec.scaling, spec.train, spec.deepspeed
    try:
        check_memory(model, info, fits[1], fits[2], fits[0], available, "this machine")
        return
    except PlanError as exc:
        too_big = str(exc).removeprefix("model: ").split("; ")[0]
    except ModelError as exc:
        raise RunError(f"model: cannot tell the model's size to shrink it: {exc}") from None
    if model.kind == "custom":
        raise RunError(
            f"model: {too_big}; a smoke run cannot shrink a custom model: make it smaller "
            "through its arguments (--set model.args.NAME=VALUE)"
        )
    why = f"scaled down: {too_big}"
    if model.kind in ("bert_mlm", "gpt_lm", "bert_classifier"):
        for key, value in _SMALL_TRANSFORMER.items():
            edit.set(f"model.{key}", value, why)
    elif model.kind == "resnet":
        edit.set("model.depth", 18, why)
    elif model.kind == "cnn":
        edit.set("model.channels", [16, 32], why)
    if getattr(model, "pretrained", None):
        edit.set("model.pretrained", None, "its weights do not fit the scaled-down model")


def _show(value: Any) -> str:
    if isinstance(value, dict) and len(str(value)) > 60:
        return "{...}"
    return "null" if value is None else str(value)
