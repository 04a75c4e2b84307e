"""The typed config that crosses the Ray boundary, and the one plan that decides what fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.errors import RunError
from orchestrator.models import DataInfo
from orchestrator.plan import DATA_CPUS, PlanError, check_data_cpus, check_fit, trials_at_once
from orchestrator.spec import (
    STREAM_DATA_FIELDS,
    ScalingSpec,
    StreamSettings,
    TuneSpec,
    WorkloadSpec,
)
from orchestrator.train.config import DatasetFacts, WorkerConfig
from orchestrator.train.trainer import PreparedRun, worker_config

ROOT = Path(__file__).resolve().parent.parent

TEXT_MANIFEST = {
    "kind": "text",
    "seq_len": 64,
    "splits": {"train": {"rows": 1000, "shards": ["a.parquet"]}, "eval": {"rows": 50}},
    "tokenizer": {
        "file": "tokenizer.json",
        "hash": "abc",
        "vocab_size": 500,
        "pad_id": 0,
        "sep_id": 3,
        "cls_id": 2,
        "mask_id": 4,
    },
}


def _bert(*sets: str) -> WorkloadSpec:
    from orchestrator.load import load_workload

    return load_workload(ROOT / "workloads/local/bert_tiny.yaml", list(sets))


def _run(manifest: dict) -> PreparedRun:
    # worker_config reads only the facts and the model info, never the shards themselves.
    return PreparedRun(None, DatasetFacts.from_manifest(manifest), DataInfo(vocab_size=500))  # type: ignore[arg-type]


def test_worker_config_survives_the_ray_boundary() -> None:
    spec = _bert("data.mlm_probability=0.2", "data.shuffle_buffer=0")
    config = worker_config(spec, _run(TEXT_MANIFEST))
    sent = json.loads(json.dumps(config.to_ray()))  # what Ray pickles is plain JSON values
    received = WorkerConfig.model_validate(sent)
    assert received == config
    assert received.model == spec.model and received.train == spec.train
    assert received.stream == StreamSettings(mlm_probability=0.2, shuffle_buffer=0, augment=False)
    assert received.dataset.tokenizer is not None
    assert received.dataset.tokenizer.special_ids() == [0, 3, 2, 4]
    with pytest.raises(ValidationError, match="janitor"):  # nothing rides along unchecked
        WorkerConfig.model_validate(sent | {"janitor": "an actor handle"})


def test_stream_settings_are_the_data_fields_a_sweep_may_search() -> None:
    assert tuple(StreamSettings.model_fields) == STREAM_DATA_FIELDS
    data = _bert().data
    assert data.stream_settings().model_dump() == {f: getattr(data, f) for f in STREAM_DATA_FIELDS}


def test_masked_lm_needs_a_mask_token_and_a_batch_of_data() -> None:
    no_mask = TEXT_MANIFEST | {"tokenizer": TEXT_MANIFEST["tokenizer"] | {"mask_id": None}}
    with pytest.raises(RunError, match=r"masked LM, which needs a tokenizer with a \[MASK\]"):
        worker_config(_bert(), _run(no_mask))
    tiny = TEXT_MANIFEST | {"splits": {"train": {"rows": 10}}}
    with pytest.raises(RunError, match="smaller than one global batch"):
        worker_config(_bert(), _run(tiny))


def test_one_ray_data_cpu_threshold_for_runs_jobs_and_sweeps() -> None:
    # 1 worker x 1.25 CPU on 2 CPUs leaves Ray Data 0.75: a read task (1 CPU) never starts.
    scaling = ScalingSpec(num_workers=1, resources_per_worker={"CPU": 1.25})
    with pytest.raises(PlanError, match="leaving Ray Data less than 1 CPU"):
        check_data_cpus(scaling, 2)
    with pytest.raises(PlanError, match="leaving Ray Data less than 1 CPU"):
        check_fit(scaling, {"CPU": 1.25}, [{"CPU": 2}])
    check_data_cpus(scaling, 1.25 + DATA_CPUS)
    check_fit(scaling, {"CPU": 1.25}, [{"CPU": 1.25 + DATA_CPUS}])
    # Sweeps keep the same CPU beside their trials: 2 trials of 0.25 + 0.5 fit in 2.5 CPUs.
    half = ScalingSpec(num_workers=1, resources_per_worker={"CPU": 0.5})
    tune = TuneSpec(space={"train.optimizer.lr": {"loguniform": (1e-4, 1e-2)}})
    assert trials_at_once(half, tune, {"CPU": 1.5 + DATA_CPUS}, 0.25, True) == 2
    too_many = tune.model_copy(update={"max_concurrent_trials": 3})
    with pytest.raises(PlanError, match="use at most 2"):
        trials_at_once(half, too_many, {"CPU": 1.5 + DATA_CPUS}, 0.25, True)
