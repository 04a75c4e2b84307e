"""The per-worker training loop: reads top to bottom, from its typed config to reported metrics.

Runs inside each Ray Train worker (`train_loop`), or in a one-worker sweep trial's own process
(`run_loop` with a `TrialSession`). Every rank follows the same schedule of reports (in Ray
Train a report is a collective), so logging, evaluation and checkpointing happen on the same
steps everywhere.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.data.stream import (
    Batch,
    Feed,
    ImageDecoding,
    eval_batches,
    mask_tokens,
    to_float_images,
)
from orchestrator.models import build_model, import_ahead, task_of
from orchestrator.spec import TrainSpec
from orchestrator.train.checkpoint import (
    Manifest,
    checkpoint_manifest,
    library_versions,
    write_manifest,
)
from orchestrator.train.config import WorkerConfig
from orchestrator.train.custom_step import StepEngine
from orchestrator.train.engines import Engine, accumulation_steps, make_engine, no_grad_eval
from orchestrator.train.roc_auc import AUC_BINS, roc_auc, score_histogram
from orchestrator.train.session import Session, TrainSession, intact_checkpoint
from orchestrator.train.utilization import GpuMeter

if TYPE_CHECKING:
    import ray.train

__all__ = ["run_loop", "steps_per_epoch", "total_steps", "train_loop"]


def steps_per_epoch(train_rows: int, train: TrainSpec, world: int) -> int:
    """Optimizer steps per epoch: rows split equally, whole micro batches and accumulations."""
    micro_batches = (train_rows // world) // train.micro_batch_size
    return micro_batches // accumulation_steps(train, world)


def total_steps(train_rows: int, train: TrainSpec, world: int) -> int:
    """The run's optimizer steps: max_steps, else whole epochs."""
    return train.max_steps or steps_per_epoch(train_rows, train, world) * train.epochs


def train_loop(raw_config: dict[str, Any]) -> None:
    """The Ray Train worker's entry point (TorchTrainer's `train_loop_per_worker`)."""
    import_ahead(raw_config["model"]["kind"], training=True)
    cfg = WorkerConfig.model_validate(raw_config)
    run_loop(cfg, TrainSession(cfg.train.checkpoint_upload))


def run_loop(cfg: WorkerConfig, session: Session) -> None:
    rank, world = session.rank, session.world
    train = cfg.train

    accum = accumulation_steps(train, world)
    per_epoch = steps_per_epoch(cfg.dataset.train_rows, train, world)  # > 0: checked by driver.py
    total = total_steps(cfg.dataset.train_rows, train, world)
    epochs = math.ceil(total / per_epoch)
    task = task_of(cfg.model)
    me = Manifest(
        0,
        0,
        0,
        world,
        cfg.deepspeed.zero_stage if cfg.deepspeed else None,
        train.precision,
        cfg.model_config_hash,
        library_versions(),
    )

    step, start_epoch, skip = 0, 0, 0
    # The run's own checkpoint (a restart) wins over the one it was started from (a sweep's
    # PBT exploit); both pass the same manifest check, before any model is built.
    resumed = session.resume_from()
    checkpoint = (intact_checkpoint(resumed) if resumed else None) or _initial(
        cfg.initial_checkpoint
    )
    if checkpoint is not None:
        saved = checkpoint_manifest(checkpoint)
        saved.check_resumable_by(me, f"checkpoint {checkpoint.path}")
        step, start_epoch, skip = saved.step, saved.epoch, saved.batches_in_epoch

    feed = _feed(cfg, session.device)
    train_shard = session.dataset("train")
    eval_shard = functools.cache(lambda: session.dataset("eval"))  # opened when first used
    # Ray Data's stream takes seconds to start (its coordinator, then read tasks in new worker
    # processes): the first epoch's starts now, overlapping building the model, and each next
    # epoch's before the one before it ends.
    from orchestrator.data.epochs import EpochStreams  # imports Ray Data: on the worker only

    streams = EpochStreams(
        train_shard, feed, train.seed, cfg.stream.shuffle_buffer, start_epoch, epochs
    )

    torch.manual_seed(train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, cfg.data_info)
    tune_for_device(model, cfg, session.device)
    engine = make_engine(model, train, cfg.deepspeed, session, accum, total)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            engine.load(directory)

    # Masks and crops are drawn on the CPU, the same on any device (see mask_tokens).
    mask_gen = torch.Generator().manual_seed(train.seed * 1000 + rank + step)
    window = _Window(engine.device)
    gpu = GpuMeter.on(engine.device, cfg)

    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        consumed = 0
        wait_started = time.perf_counter()
        for batch in streams.epoch(epoch):
            consumed += 1
            if epoch == start_epoch and consumed <= skip:  # resume at the saved data position
                wait_started = time.perf_counter()
                continue
            window.wait += time.perf_counter() - wait_started
            inputs, labels = _prepare(batch, task, cfg, engine, mask_gen)
            if isinstance(engine, StepEngine):  # train.step: the workload's own step
                stepped = engine.run((inputs, labels))
                window.samples += len(labels)
            else:
                with engine.forward_context():
                    logits, target = _forward(engine, inputs, labels, task, cfg)
                    loss = F.cross_entropy(logits, target, ignore_index=-100)
                window.add_loss(loss, len(labels))
                stepped = engine.backward(loss)
            if not stepped:
                wait_started = time.perf_counter()
                continue
            step += 1
            done = step >= total
            evaluate = done or bool(train.eval_every and step % train.eval_every == 0)
            save = done or bool(train.checkpoint_every and step % train.checkpoint_every == 0)
            if evaluate or save or step % train.log_every == 0:
                # Training throughput first, so evaluation and saving do not count as step time.
                metrics = window.flush(step, epoch, engine.lr(), cfg, world) | {
                    "total_steps": total
                }
                if gpu is not None:
                    metrics |= gpu.read(metrics["samples_per_s"], world)
                if isinstance(engine, StepEngine):  # its metrics, evaluation and samples
                    evaluated = _eval_inputs(eval_shard(), task, cfg, engine) if evaluate else None
                    metrics = engine.report(metrics, evaluated)
                elif evaluate:
                    metrics |= _evaluate(eval_shard(), task, cfg, engine)
                position = (
                    (epoch, consumed) if consumed < _batches_hint(cfg, world) else (epoch + 1, 0)
                )
                # Evaluation (done above) and writing a checkpoint are not training time; a
                # report's own time is, and falls in the next window.
                if not save:
                    window.restart()
                _report(session, metrics, engine, me, (step, *position), save)
                if save:
                    window.restart()
            if done:
                break
            wait_started = time.perf_counter()


class _Window:
    """Accumulates loss and timings between reports.

    The loss is summed on the engine's device: reading it every micro step (`.item()`) would
    make the host wait for the GPU at each step. It is read once per report, after the one
    all-reduce of the window's totals, which runs on that device too (NCCL takes CUDA tensors
    only).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last_step = 0
        self.restart()

    def add_loss(self, loss: torch.Tensor, n: int) -> None:
        self.loss_sum += loss.detach().to(torch.float64)
        self.count += 1
        self.samples += n

    def totals(self) -> torch.Tensor:
        """This worker's (loss sum, micro steps, samples, data wait) on the device."""
        counts = torch.tensor([self.count, self.samples, self.wait], dtype=torch.float64)
        return torch.cat([self.loss_sum.reshape(1), counts.to(self.device)])

    def flush(
        self, step: int, epoch: int, lr: float, cfg: WorkerConfig, world: int
    ) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        loss_sum, count, samples, wait = _all_sum(self.totals()).tolist()
        steps = max(1, step - self.last_step)
        out = {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / max(1.0, count),
            "lr": lr,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_s": wait / world / steps,
            "data_wait_share": (wait / world) / elapsed,
        }
        if cfg.dataset.seq_len is not None:
            out["tokens_per_s"] = out["samples_per_s"] * cfg.dataset.seq_len
        self.last_step = step
        return out

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = self.samples = 0


def _prepare(
    batch: Batch, task: str, cfg: WorkerConfig, engine: Engine, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored batch -> (model inputs, labels) on the engine's device."""
    if task == "masked_lm":
        tok = cfg.dataset.tokenizer
        assert tok is not None and tok.mask_id is not None  # checked by worker_config
        inputs, labels = mask_tokens(
            batch["input_ids"].long(),
            mask_id=tok.mask_id,
            vocab_size=tok.vocab_size,
            special_ids=tok.special_ids(),
            probability=cfg.stream.mlm_probability,
            generator=gen,
        )
    elif task == "causal_lm":
        inputs = labels = batch["input_ids"].long()
    elif cfg.dataset.kind == "tabular":
        inputs = batch["features"].to(engine.input_dtype)
        labels = batch["label"].long()
    elif cfg.dataset.kind == "labeled_text":  # token ids; the model masks the padding itself
        inputs, labels = batch["input_ids"].long(), batch["label"].long()
    else:
        pixels = batch["image"].to(engine.device, non_blocking=True)  # uint8: see Feed
        inputs = to_float_images(pixels, augment=cfg.stream.augment, generator=gen)
        inputs = inputs.to(engine.input_dtype)
        if _channels_last(cfg, engine.device):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].long()
    return inputs.to(engine.device, non_blocking=True), labels.to(engine.device, non_blocking=True)


def _feed(cfg: WorkerConfig, device: torch.device) -> Feed:
    image = cfg.dataset.image
    decoding = None
    if cfg.dataset.kind == "image":
        assert image is not None  # image data: the manifest says how it is stored
        decoding = ImageDecoding(
            image.encoding,
            image.shape,
            getattr(cfg.model, "image_size", 28),
            cfg.data_info.channels or 1,
        )
    return Feed(
        cfg.train.micro_batch_size,
        cfg.stream.prefetch_batches,
        cfg.stream.pin_memory and device.type == "cuda",
        decoding,
    )


def _channels_last(cfg: WorkerConfig, device: torch.device) -> bool:
    """CNNs on a GPU run faster on channels-last images (cuDNN's native order for them)."""
    return cfg.train.channels_last and device.type == "cuda" and cfg.dataset.kind == "image"


def tune_for_device(model: torch.nn.Module, cfg: WorkerConfig, device: torch.device) -> None:
    """The GPU settings of `train:` that apply before the engine wraps the model."""
    if device.type != "cuda":
        return
    if cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if _channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)


def _initial(uri: str | None) -> ray.train.Checkpoint | None:
    import ray.train

    return ray.train.Checkpoint(uri) if uri is not None else None


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _forward(
    engine: Engine, inputs: torch.Tensor, labels: torch.Tensor, task: str, cfg: WorkerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) in fp32, one row per predicted position; targets -100 are ignored.

    A BERT MLM that predicts at given positions (model_zoo.MaskedLMBert) gets the masked ones:
    the vocabulary projection, by far the largest matrix product at BERT's sizes, then runs on
    about 15% of the tokens. The loss is the same: the other positions carry no label.
    """
    if (
        task == "masked_lm"
        and cfg.train.mlm_predict == "masked"
        and getattr(engine.module, "predicts_at_positions", False)
    ):
        at = labels != -100
        return _logits(engine.model(inputs, predict_at=at)).float(), labels[at]
    logits = _logits(engine.model(inputs)).float()
    if task == "causal_lm":  # predict token t+1 from tokens up to t
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def _evaluate(shard: Any, task: str, cfg: WorkerConfig, engine: Engine) -> dict[str, float]:
    """Loss and accuracy (LMs: perplexity; classifiers: macro precision/recall/F1, and ROC
    AUC for two classes) on eval data."""
    if shard is None:
        return {}
    gen = torch.Generator().manual_seed(cfg.train.seed)  # the same masks at every evaluation
    totals = _EvalTotals(engine.device, cfg.data_info.num_classes or 1, task)
    with no_grad_eval(engine):
        for i, batch in enumerate(eval_batches(shard, _feed(cfg, engine.device))):
            if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                break
            inputs, labels = _prepare(batch, task, cfg, engine, gen)
            totals.add(*_forward(engine, inputs, labels, task, cfg))
    return totals.metrics()


class _EvalTotals:
    """Evaluation's sums, kept on the engine's device until the end: one all-reduce and one
    read per evaluation rather than a host-device sync per batch. Binary classifiers also get
    ROC AUC, from score histograms that sum across workers."""

    def __init__(self, device: torch.device, classes: int, task: str) -> None:
        self.classes, self.task = classes, task
        self.binary = task == "classification" and classes == 2
        f64 = torch.float64
        self.sums = torch.zeros(3, dtype=f64, device=device)  # loss, correct, count
        self.confusion = torch.zeros(classes, classes, dtype=f64, device=device)
        self.scores = torch.zeros(2, AUC_BINS, dtype=f64, device=device)

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        # Positions without a label (-100) are weighed 0 rather than dropped: dropping them
        # (boolean indexing) or a data-sized bincount would make the host wait for the GPU.
        keep = target != -100
        weight = keep.double()
        predicted = logits.argmax(-1)
        loss = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        correct = ((predicted == target) & keep).sum()
        self.sums += torch.stack([loss.double(), correct.double(), weight.sum()])
        if self.task == "classification":
            pair = torch.where(keep, target * self.classes + predicted, 0)
            self.confusion.view(-1).index_add_(0, pair, weight)
        if self.binary:
            probability = logits.softmax(-1)[:, 1]
            self.scores += score_histogram(probability, target.clamp(min=0), weight)

    def metrics(self) -> dict[str, float]:
        # One all-reduce of every sum (each collective is a round trip between the workers).
        parts = [self.sums]
        if self.task == "classification":
            parts.append(self.confusion)
        if self.binary:
            parts.append(self.scores)
        flat = _all_sum(torch.cat([t.reshape(-1) for t in parts])).cpu()
        sums, *tables = (
            chunk.view_as(t)
            for t, chunk in zip(parts, flat.split([t.numel() for t in parts]), strict=True)
        )
        loss_sum, correct, count = sums.tolist()
        if count == 0:
            return {}
        out = {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}
        if self.task != "classification":
            out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
            return out
        confusion = tables[0]
        tp = confusion.diag()
        precision = tp / confusion.sum(0).clamp(min=1)
        recall = tp / confusion.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        out.update(
            eval_precision=precision.mean().item(),
            eval_recall=recall.mean().item(),
            eval_f1=f1.mean().item(),
        )
        if self.binary and (auc := roc_auc(tables[1])) is not None:
            out["eval_roc_auc"] = auc
        return out


def _eval_inputs(
    shard: Any, task: str, cfg: WorkerConfig, engine: Engine
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's eval batches as (inputs, labels), at most train.eval_batches of them."""
    if shard is None:
        return
    gen = torch.Generator().manual_seed(cfg.train.seed)  # the same masks at every evaluation
    for i, batch in enumerate(eval_batches(shard, _feed(cfg, engine.device))):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            return
        yield _prepare(batch, task, cfg, engine, gen)


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the workers; `tensor` must be on the engine's device (NCCL: CUDA only)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def _batches_hint(cfg: WorkerConfig, world: int) -> int:
    """Micro batches per worker per epoch (equal split, drop_last)."""
    return (cfg.dataset.train_rows // world) // cfg.train.micro_batch_size


def _report(
    session: Session,
    metrics: dict[str, Any],
    engine: Engine,
    me: Manifest,
    state: tuple[int, int, int],
    save: bool,
) -> None:
    step, epoch, consumed = state
    if not save:
        session.report(metrics, None, step)
        return
    directory = tempfile.mkdtemp(prefix="orch-checkpoint-")  # the session removes it
    try:
        engine.save(directory, session.rank)
        if session.rank == 0:
            here = Manifest(
                step,
                epoch,
                consumed,
                me.world_size,
                me.zero_stage,
                me.precision,
                me.model_config_hash,
                me.versions,
            )
            write_manifest(directory, here)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    if not any(os.scandir(directory)):  # a rank with nothing to save (DDP's other ranks)
        shutil.rmtree(directory, ignore_errors=True)
        session.report(metrics, None, step)
        return
    session.report(metrics, directory, step)
