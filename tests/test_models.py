"""The model-kind table is the one source of what orch knows about each `model.kind`."""

from __future__ import annotations

import typing
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.data.formats import FORMATS
from orchestrator.models import (
    MODEL_KINDS,
    DataInfo,
    LogitsOnly,
    build_model,
    import_model_library,
    input_example,
    task_of,
)
from orchestrator.spec import (
    FORMAT_INPUTS,
    MODEL_SECTIONS,
    TASK_METRICS,
    CustomModel,
    DataFormat,
    ModelSpec,
    WorkloadSpec,
    reported_metrics,
    workload_schema,
)

# The smallest model of each kind, with the data it would be trained on; a new kind needs one.
TINY: dict[str, tuple[dict[str, Any], DataInfo]] = {
    "bert_mlm": (
        {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
        DataInfo(vocab_size=50),
    ),
    "gpt_lm": (
        {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_seq_len": 32},
        DataInfo(vocab_size=50),
    ),
    "resnet": (
        {"depth": 18, "num_classes": 3, "in_channels": 1, "image_size": 32},
        DataInfo(num_classes=3, channels=1),
    ),
    "cnn": ({"channels": [4], "image_size": 28}, DataInfo(num_classes=10, channels=1)),
    "custom": (
        {"build": "torchvision.models:resnet18", "args": {"num_classes": 3}},
        DataInfo(num_classes=3),
    ),
    "mlp": ({"hidden_sizes": [4], "batch_norm": True}, DataInfo(num_classes=2, num_features=5)),
    "bert_classifier": (
        {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_seq_len": 32},
        DataInfo(vocab_size=50, num_classes=3, pad_id=0, seq_len=24),
    ),
}


def test_table_has_exactly_the_spec_kinds() -> None:
    union = typing.get_args(typing.get_args(ModelSpec)[0])
    assert set(MODEL_SECTIONS.values()) == set(union)
    assert {kind: entry.spec for kind, entry in MODEL_KINDS.items()} == MODEL_SECTIONS
    assert all(entry.kind == kind for kind, entry in MODEL_KINDS.items())
    assert set(TINY) == set(MODEL_KINDS), "give each model kind a tiny config in TINY"


@pytest.mark.parametrize("kind", sorted(MODEL_SECTIONS))
def test_each_kind_has_a_task_and_an_example_its_model_accepts(kind: str) -> None:
    fields, data = TINY[kind]
    raw = {"kind": kind, **fields}
    spec: Any = MODEL_SECTIONS[kind].model_validate(raw)
    assert task_of(spec) in TASK_METRICS
    assert reported_metrics(spec) == TASK_METRICS[task_of(spec)]
    example = input_example(spec, data)
    # model.json holds the section as a plain dict; the answer must not depend on which.
    assert np.array_equal(example, input_example(raw, data))
    assert example.shape[0] == 1
    model = build_model(raw, data).eval()
    if hasattr(model, "config"):  # as tracking logs it: transformers models wrapped
        model = LogitsOnly(model).eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example))
    assert output.shape[0] == 1


def test_token_examples_fit_short_position_tables() -> None:
    raw = {"kind": "gpt_lm", "hidden_size": 8, "num_layers": 1, "num_heads": 2, "max_seq_len": 8}
    example = input_example(raw, DataInfo(vocab_size=20))
    with torch.no_grad():
        LogitsOnly(build_model(raw, DataInfo(vocab_size=20)))(torch.from_numpy(example))


def test_custom_examples_follow_the_declared_task() -> None:
    lm = {
        "kind": "custom",
        "build": "torch.nn:Embedding",
        "args": {"num_embeddings": 10, "embedding_dim": 4},
        "task": "causal_lm",
    }
    example = input_example(lm, DataInfo())
    assert example.dtype == np.int64 and example.ndim == 2
    build_model(lm, DataInfo())(torch.from_numpy(example))
    image = input_example({"kind": "custom", "build": "m:f"}, DataInfo(channels=1))
    assert image.shape == (1, 1, 32, 32) and image.dtype == np.float32


def test_import_model_library_ignores_kinds_without_one() -> None:
    for kind in [*MODEL_KINDS, "no_such_kind"]:
        import_model_library(kind)


def test_kind_facts_stay_out_of_the_schema() -> None:
    """task and inputs are class-level facts, not YAML keys; only custom lets the user say."""
    for kind, section in MODEL_SECTIONS.items():
        assert "inputs" not in section.model_fields
        assert ("task" in section.model_fields) == (section is CustomModel), kind
    model = workload_schema()["$defs"]["BertMLMModel"]["properties"]
    assert "task" not in model and "inputs" not in model


def test_every_data_format_says_what_it_yields() -> None:
    """The spec's format -> inputs table agrees with the readers' table in orchestrator.data."""
    assert set(FORMAT_INPUTS) == set(typing.get_args(DataFormat)) == {"auto", *FORMATS}
    yields = {
        "text": "tokens",
        "image": "images",
        "tabular": "features",
        "labeled_text": "labeled_tokens",
    }
    for name, gives in FORMAT_INPUTS.items():
        if name != "auto":
            assert gives in (None, yields[FORMATS[name].kind]), name


@pytest.mark.parametrize(
    ("model", "data_format", "message"),
    [
        ({"kind": "bert_mlm"}, "mnist", "bert_mlm trains on text, not mnist images"),
        ({"kind": "gpt_lm"}, "image_folder", "gpt_lm trains on text, not image_folder images"),
        ({"kind": "cnn"}, "jsonl", "cnn trains on images, not jsonl text"),
        ({"kind": "resnet"}, "text", "resnet trains on images, not text text"),
    ],
)
def test_model_and_data_must_agree_on_inputs(
    model: dict[str, Any], data_format: str, message: str
) -> None:
    raw = {"name": "w", "model": model, "data": {"train": "x", "format": data_format}}
    with pytest.raises(ValueError, match=message):
        WorkloadSpec.model_validate(raw)
    custom = {"kind": "custom", "build": "m:f"}
    WorkloadSpec.model_validate(raw | {"model": custom})  # orch cannot know; prepare will tell


IMPORT_AHEAD_THEN_BUILD = """
import time
from orchestrator.models import DataInfo, build_model, import_ahead

import_ahead("bert_mlm", training=True)
time.sleep(0.2)  # the import thread is inside transformers now
spec = {"kind": "bert_mlm", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 16}
model = build_model(spec, DataInfo(vocab_size=100))
from transformers import BertForMaskedLM
print(isinstance(model, BertForMaskedLM))
"""


def test_a_model_builds_while_its_library_is_imported_ahead() -> None:
    """transformers fails `from transformers import BertConfig` while another thread is still
    importing it; building waits for the import started ahead instead (a fresh process, so
    nothing is imported yet)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", IMPORT_AHEAD_THEN_BUILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
