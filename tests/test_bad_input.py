"""Every kind of bad workload input gives exit code 2 and a message naming file, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.load import SpecError, load_workload

MINIMAL = "name: t\nmodel: {kind: cnn}\ndata: {train: data/}\n"

# (id, file text, --set overrides, expected fragments of the error output)
CASES: list[tuple[str, str, list[str], list[str]]] = [
    (
        "unknown-top-key",
        MINIMAL + "trian: {}\n",
        [],
        ["bad.yaml:4", "trian", "did you mean train?"],
    ),
    (
        "unknown-nested-key",
        MINIMAL + "train: {micro_bach_size: 4}\n",
        [],
        ["bad.yaml:4", "train.micro_bach_size", "did you mean micro_batch_size?"],
    ),
    (
        "unknown-deep-key",
        MINIMAL + "train:\n  optimizer:\n    learning_rate: 0.1\n",
        [],
        ["bad.yaml:6", "train.optimizer.learning_rate", "unknown field", "allowed:", "lr"],
    ),
    (
        "unknown-model-field",
        "name: t\nmodel:\n  kind: bert_mlm\n  hidden_sze: 64\ndata: {train: x}\n",
        [],
        ["bad.yaml:4", "model.hidden_sze", "did you mean hidden_size?"],
    ),
    (
        "unknown-model-kind",
        "name: t\nmodel: {kind: transformer}\ndata: {train: x}\n",
        [],
        ["bad.yaml:2", "model.kind", "'transformer'", "bert_mlm, gpt_lm, resnet, cnn, custom"],
    ),
    (
        "missing-model-kind",
        "name: t\nmodel: {hidden_size: 64}\ndata: {train: x}\n",
        [],
        ["model.kind", "missing", "bert_mlm"],
    ),
    ("missing-name", "model: {kind: cnn}\ndata: {train: x}\n", [], ["name", "required"]),
    (
        "missing-data-train",
        "name: t\nmodel: {kind: cnn}\ndata: {}\n",
        [],
        ["data.train", "required"],
    ),
    (
        "wrong-type-int",
        MINIMAL + "train: {micro_batch_size: lots}\n",
        [],
        ["bad.yaml:4", "train.micro_batch_size", "valid integer", "'lots'"],
    ),
    (
        "wrong-type-section",
        MINIMAL + "scaling: 4\n",
        [],
        ["bad.yaml:4", "scaling", "valid dictionary"],
    ),
    (
        "zero-workers",
        MINIMAL + "scaling: {num_workers: 0}\n",
        [],
        ["scaling.num_workers", "greater than 0", "got 0"],
    ),
    (
        "negative-steps",
        MINIMAL + "train: {max_steps: -5}\n",
        [],
        ["train.max_steps", "greater than 0", "got -5"],
    ),
    (
        "zero-lr",
        MINIMAL + "train: {optimizer: {lr: 0}}\n",
        [],
        ["train.optimizer.lr", "greater than 0"],
    ),
    (
        "bad-optimizer",
        MINIMAL + "train: {optimizer: {name: adam}}\n",
        [],
        ["train.optimizer.name", "'adamw' or 'sgd'", "'adam'"],
    ),
    (
        "bad-zero-stage",
        MINIMAL + "deepspeed: {zero_stage: 4}\n",
        [],
        ["deepspeed.zero_stage", "0, 1, 2 or 3", "got 4"],
    ),
    (
        "batch-not-divisible",
        MINIMAL
        + "train: {global_batch_size: 100, micro_batch_size: 8}\nscaling: {num_workers: 2}\n",
        [],
        ["bad.yaml:4", "train.global_batch_size", "not divisible", "multiple of 16"],
    ),
    (
        "fp16-without-gpu",
        MINIMAL + "train: {precision: fp16}\n",
        [],
        ["train.precision", "fp16 needs a GPU", "bf16"],
    ),
    (
        "compile-without-gpu",
        MINIMAL + "train: {compile: true}\n",
        [],
        ["train.compile", "GPU setting", "scaling.use_gpu", "set it false"],
    ),
    (
        "precision-twice",
        MINIMAL + "train: {precision: bf16}\ndeepspeed: {extra: {fp16: {enabled: true}}}\n",
        [],
        ["deepspeed.extra.fp16", "train.precision"],
    ),
    (
        "zero-stage-in-extra",
        MINIMAL + "deepspeed: {zero_stage: 2, extra: {zero_optimization: {stage: 3}}}\n",
        [],
        ["deepspeed.extra.zero_optimization.stage", "deepspeed.zero_stage"],
    ),
    (
        "offload-without-zero",
        MINIMAL + "deepspeed: {zero_stage: 0, offload_optimizer: cpu}\n",
        [],
        ["deepspeed.offload_optimizer", "zero_stage 1, 2 or 3"],
    ),
    (
        "param-offload-not-zero3",
        MINIMAL + "deepspeed: {zero_stage: 2, offload_param: cpu}\n",
        [],
        ["deepspeed.offload_param", "zero_stage 3"],
    ),
    (
        "gpu-resources-without-use-gpu",
        MINIMAL + "scaling: {resources_per_worker: {GPU: 1}}\n",
        [],
        ["scaling.resources_per_worker.GPU", "use_gpu"],
    ),
    (
        "heads-do-not-divide",
        "name: t\nmodel: {kind: gpt_lm, hidden_size: 100, num_heads: 3}\ndata: {train: x}\n",
        [],
        ["model.num_heads", "not divisible"],
    ),
    (
        "seq-longer-than-positions",
        "name: t\nmodel: {kind: bert_mlm, max_seq_len: 64}\ndata: {train: x, seq_len: 128}\n",
        [],
        ["data.seq_len", "exceeds model.max_seq_len"],
    ),
    (
        "image-model-on-text",
        "name: t\nmodel: {kind: resnet}\ndata: {train: x, format: text}\n",
        [],
        ["data.format", "images"],
    ),
    (
        "bad-name",
        "name: my run!\nmodel: {kind: cnn}\ndata: {train: x}\n",
        [],
        ["bad.yaml:1", "name", "not a valid name", "letters, digits"],
    ),
    (
        "bad-custom-import-path",
        "name: t\nmodel: {kind: custom, build: not a path}\ndata: {train: x}\n",
        [],
        ["model.build", "pattern"],
    ),
    (
        "tune-unknown-path",
        MINIMAL + "tune:\n  space:\n    train.optimizer.lrr: {loguniform: [1.0e-5, 1.0e-3]}\n",
        [],
        ["tune.space.train.optimizer.lrr", "no such field"],
    ),
    (
        "tune-domain-two-keys",
        MINIMAL + "tune:\n  space:\n    train.optimizer.lr: {uniform: [0.1, 0.2], choice: [1]}\n",
        [],
        ["bad.yaml:6", "tune.space.train.optimizer.lr", "exactly one"],
    ),
    (
        "tune-low-above-high",
        MINIMAL + "tune:\n  space:\n    train.optimizer.lr: {loguniform: [0.1, 0.01]}\n",
        [],
        ["tune.space.train.optimizer.lr", "must be below"],
    ),
    (
        "pbt-without-checkpoints",
        MINIMAL + "tune:\n  scheduler: {kind: pbt}\n  space:\n    train.seed: {choice: [1, 2]}\n",
        [],
        ["tune.scheduler.kind", "checkpoint_every"],
    ),
    (
        "promote-if-code",
        MINIMAL + "tracking:\n  mlflow: {register_as: m, promote_if: \"__import__('os')\"}\n",
        [],
        ["tracking.mlflow.promote_if", "cannot parse", "metric OP number"],
    ),
    ("duplicate-key", MINIMAL + "name: again\n", [], ["bad.yaml:4", "name", "duplicate key"]),
    ("yaml-syntax", "name: [t\nmodel: {kind: cnn}\n", [], ["bad.yaml:", "invalid YAML"]),
    ("yaml-tab", "name: t\nmodel:\n\tkind: cnn\n", [], ["bad.yaml:3", "invalid YAML"]),
    ("empty-file", "", [], ["bad.yaml", "is empty"]),
    ("comments-only", "# nothing here\n", [], ["bad.yaml", "is empty"]),
    ("top-level-list", "- name: t\n", [], ["bad.yaml:1", "top level must be a mapping", "list"]),
    ("top-level-scalar", "hello\n", [], ["bad.yaml:1", "top level must be a mapping", "string"]),
    ("set-no-equals", MINIMAL, ["train.max_steps"], ["--set train.max_steps", "dotted.key=value"]),
    ("set-empty-key", MINIMAL, ["=3"], ["--set =3", "dotted.key=value"]),
    ("set-empty-segment", MINIMAL, ["train..lr=3"], ["--set train..lr=3", "dotted.key=value"]),
    (
        "set-unknown-key",
        MINIMAL,
        ["train.micro_bach_size=3"],
        ["--set train.micro_bach_size=3", "did you mean micro_batch_size?"],
    ),
    (
        "set-bad-value",
        MINIMAL,
        ["scaling.num_workers=many"],
        ["--set scaling.num_workers=many", "scaling.num_workers", "valid integer"],
    ),
    (
        "set-into-scalar",
        MINIMAL,
        ["name.first=x"],
        ["--set name.first=x", "cannot set inside name", "not a mapping"],
    ),
    (
        "set-bad-yaml",
        MINIMAL,
        ["train.max_steps=[1"],
        ["--set train.max_steps=[1", "not valid YAML"],
    ),
]


@pytest.mark.parametrize(
    ("text", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_exits_2_with_clear_error(
    tmp_path: Path, text: str, overrides: list[str], expected: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    args = ["validate", str(tmp_path / "bad.yaml")]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"


def test_there_are_at_least_25_distinct_bad_inputs() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_missing_file_and_directory(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml"), str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path / 'nope.yaml'}: no such file" in result.output
    assert f"{tmp_path}: is a directory" in result.output
    assert "2 of 2 workload(s) invalid" in result.output


def test_binary_file(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_bytes(b"\xff\xfe\x00garbage")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "w.yaml")])
    assert result.exit_code == 2
    assert "not UTF-8" in result.output


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text(
        "name: t\nmodel: {kind: cnn, nope: 1}\ndata: {train: x}\n"
        "train: {max_steps: 0, optimizer: {name: rmsprop}}\nscaling: {num_workers: -1}\n"
    )
    with pytest.raises(SpecError) as info:
        load_workload(tmp_path / "w.yaml")
    paths = [p.path for p in info.value.problems]
    assert paths == ["model.nope", "train.max_steps", "train.optimizer.name", "scaling.num_workers"]
    assert [p.line for p in info.value.problems] == [2, 4, 4, 5]


def test_extends_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: c.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: a.yaml\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "a.yaml")])
    assert result.exit_code == 2
    assert "c.yaml:1: extends: cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml" in result.output


def test_extends_self(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nextends: a.yaml\n")
    with pytest.raises(SpecError, match=r"a.yaml:2: extends: cycle: a.yaml -> a.yaml"):
        load_workload(tmp_path / "a.yaml")


def test_extends_missing_parent(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(MINIMAL + "extends: base/none.yaml\n")
    with pytest.raises(SpecError) as info:
        load_workload(tmp_path / "a.yaml")
    (problem,) = info.value.problems
    assert (problem.path, problem.line) == ("extends", 4)
    assert "parent base/none.yaml does not exist" in problem.message
    assert str(tmp_path / "base" / "none.yaml") in problem.message


def test_extends_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(MINIMAL + "extends: {file: x}\n")
    with pytest.raises(SpecError, match="must be a file name or a list"):
        load_workload(tmp_path / "a.yaml")


def test_error_in_parent_names_the_parent_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  optimizer: {lr: -1}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n" + MINIMAL)
    with pytest.raises(SpecError) as info:
        load_workload(tmp_path / "child.yaml")
    (problem,) = info.value.problems
    assert problem.source == str((tmp_path / "base.yaml").resolve())
    assert (problem.path, problem.line) == ("train.optimizer.lr", 2)


def test_unusable_tracking_store_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    # A plain directory is MLflow's retired file store, which MLflow refuses when the client
    # is made: that refusal, too, is the user's tracking URI to fix.
    result = CliRunner().invoke(app, ["runs", "--tracking-uri", str(tmp_path / "store")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"cannot read runs from {tmp_path / 'store'}" in result.output
