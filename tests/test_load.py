"""Loading valid workloads: extends, --set, defaults, the resolved output and the JSON Schema."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import jsonschema
import pydantic
import pytest
import yaml

from orchestrator import WorkloadSpec, load_workload, workload_schema
from orchestrator.load import parse_override

MINIMAL = "name: t\nmodel: {kind: cnn}\ndata: {train: data/}\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_short_yaml_gets_defaults(tmp_path: Path) -> None:
    spec = load_workload(write(tmp_path / "w.yaml", MINIMAL))
    assert spec.model.kind == "cnn"
    assert spec.train.optimizer.name == "adamw"
    assert spec.scaling.num_workers == 1
    assert spec.deepspeed is None and spec.tune is None
    assert spec.tracking.mlflow.enabled


def test_extends_chain_merges_mappings_deeply(tmp_path: Path) -> None:
    write(
        tmp_path / "base" / "root.yaml",
        "train: {optimizer: {lr: 0.1, weight_decay: 0.5}, seed: 1}\n",
    )
    write(
        tmp_path / "base" / "mid.yaml",
        "extends: root.yaml\ntrain: {optimizer: {lr: 0.2}}\nscaling: {num_workers: 4}\n",
    )
    child = write(
        tmp_path / "child.yaml",
        "extends: base/mid.yaml\n" + MINIMAL + "train: {seed: 7}\n",
    )
    spec = load_workload(child)
    assert spec.train.optimizer.lr == 0.2  # mid overrides root
    assert spec.train.optimizer.weight_decay == 0.5  # kept from root
    assert spec.train.seed == 7  # child overrides root
    assert spec.scaling.num_workers == 4


def test_extends_list_later_parents_win(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train: {seed: 1, epochs: 3}\n")
    write(tmp_path / "b.yaml", "train: {seed: 2}\n")
    spec = load_workload(write(tmp_path / "w.yaml", "extends: [a.yaml, b.yaml]\n" + MINIMAL))
    assert (spec.train.seed, spec.train.epochs) == (2, 3)


def test_lists_replace_rather_than_concatenate(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "model: {kind: cnn, channels: [8, 16, 32]}\n")
    spec = load_workload(
        write(
            tmp_path / "w.yaml",
            "extends: a.yaml\nname: t\nmodel: {channels: [4]}\ndata: {train: x}\n",
        )
    )
    assert spec.model.channels == [4]


def test_set_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    spec = load_workload(
        write(tmp_path / "w.yaml", MINIMAL),
        [
            "train.optimizer.lr=3e-4",
            "scaling.use_gpu=false",
            "scaling.num_workers=2",
            "train.optimizer.betas=[0.9, 0.95]",
            "deepspeed.zero_stage=3",  # creates the section
            "name=renamed",
        ],
    )
    assert spec.train.optimizer.lr == pytest.approx(3e-4)
    assert spec.scaling.use_gpu is False
    assert spec.scaling.num_workers == 2
    assert spec.train.optimizer.betas == (0.9, 0.95)
    assert spec.deepspeed is not None and spec.deepspeed.zero_stage == 3
    assert spec.name == "renamed"


def test_set_is_applied_after_extends(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train: {seed: 1}\n")
    spec = load_workload(
        write(tmp_path / "w.yaml", "extends: a.yaml\n" + MINIMAL), ["train.seed=9"]
    )
    assert spec.train.seed == 9


def test_set_value_may_contain_equals() -> None:
    assert parse_override("tracking.mlflow.promote_if=eval_loss <= 2") == (
        ("tracking", "mlflow", "promote_if"),
        "eval_loss <= 2",
    )


def test_float_exponents_without_dot_are_floats(tmp_path: Path) -> None:
    spec = load_workload(
        write(
            tmp_path / "w.yaml",
            MINIMAL + "tune:\n  space:\n    train.optimizer.lr: {choice: [1e-4, 3e-4]}\n",
        )
    )
    assert spec.tune is not None
    assert spec.tune.space["train.optimizer.lr"].choice == [1e-4, 3e-4]


def test_spec_is_frozen(tmp_path: Path) -> None:
    spec = load_workload(write(tmp_path / "w.yaml", MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        spec.train.seed = 3  # type: ignore[misc]


def test_resolved_output_is_itself_a_valid_workload(tmp_path: Path) -> None:
    spec = load_workload(Path("workloads/bert_pretrain.yaml"))
    dumped = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    again = load_workload(write(tmp_path / "resolved.yaml", dumped))
    assert again == spec


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    text = (
        "name: t\nmodel: {kind: cnn}\ndata: {train: x}\n"
        "train:\n  optimizer: &opt {name: sgd, lr: 0.5}\n"
        "tune:\n  space:\n    train.optimizer.lr: {choice: [0.1]}\n"
        "  scheduler: {<<: {kind: asha}, grace_period: 2}\n"
    )
    spec = load_workload(write(tmp_path / "w.yaml", text))
    assert spec.train.optimizer.name == "sgd"
    assert spec.tune is not None and spec.tune.scheduler.kind == "asha"


def test_schema_accepts_shipped_workloads_and_rejects_typos() -> None:
    schema = workload_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(Path("workloads").glob("*.yaml")) + sorted(
        Path("workloads/local").glob("*.yaml")
    ):
        raw = yaml.safe_load(path.read_text())
        errors = [e.message for e in validator.iter_errors(raw)]
        assert errors == [], f"{path}: {errors}"
    raw = yaml.safe_load(Path("workloads/local/bert_tiny.yaml").read_text())
    raw["train"]["micro_bach_size"] = 3
    assert any("micro_bach_size" in e.message for e in validator.iter_errors(raw))


def test_schema_describes_every_field() -> None:
    """Descriptions become editor hover text and --help; none may be missing."""

    models = _all_models(WorkloadSpec)
    assert len(models) > 15
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def _all_models(root: type[pydantic.BaseModel]) -> set[type[pydantic.BaseModel]]:
    found: set[type[pydantic.BaseModel]] = set()

    def visit(tp: object) -> None:
        if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel) and tp not in found:
            found.add(tp)
            for field in tp.model_fields.values():
                visit(field.annotation)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return found


def test_schema_file_in_repo_is_current() -> None:
    shipped = json.loads(Path("workloads/orch.schema.json").read_text())
    assert shipped == workload_schema(), "regenerate with: orch schema > workloads/orch.schema.json"
