"""ONNX and TorchScript exports of every built-in kind, checked on real prepared data (no Ray).

Each test builds a run's model directory the way a run's end does (`export_model` of a
checkpoint, model.json recording the prepared data), from shards that orch's own preparation
made of the real data in ../shared/data: MNIST t10k for images, tinyshakespeare.txt
tokenized with orch's WordPiece trainer for tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import LOCAL, SHAKESPEARE, quoted, tiny_cnn
from typer.testing import CliRunner

import orchestrator
from orchestrator.cli import app
from orchestrator.data import PreparedData, prepare
from orchestrator.errors import ExportError
from orchestrator.exporting import EXPORTS_FILE, export_at_end, export_model
from orchestrator.exporting.samples import check_data
from orchestrator.load import load_workload
from orchestrator.models import LogitsOnly, build_model, load_exported
from orchestrator.spec import ExportSpec, WorkloadSpec, workload_schema
from orchestrator.train.checkpoint import Manifest, write_manifest
from orchestrator.train.checkpoint import export_model as export_checkpoint_dir

FORMATS = ["onnx", "torchscript"]
SEQ_LEN = 32


# --------------------------------------------------------------------------- the data
def _shakespeare_shards(shared: Path, root: Path) -> None:
    """tinyshakespeare.txt tokenized by orch's WordPiece trainer into orch's text shards
    (orch's own text preparation runs on Ray; these are its columns, used as they are)."""
    import pyarrow.fs as pafs

    from orchestrator.data.shards import ShardWriter, text_schema
    from orchestrator.data.tokenizer import train_tokenizer
    from orchestrator.spec import TokenizerSpec

    lines = (shared / SHAKESPEARE).read_text().splitlines()[:4000]
    tokenizer = train_tokenizer(TokenizerSpec(kind="wordpiece", vocab_size=500), iter(lines))
    ids = np.concatenate([e.ids for e in tokenizer.encode_batch(lines)]).astype(np.int32)
    rows = ids[: len(ids) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN)
    for split, part in (("train", rows[:-200]), ("eval", rows[-200:])):
        writer = ShardWriter(pafs.LocalFileSystem(), str(root / split), text_schema(SEQ_LEN), 128)
        for i, row in enumerate(part):
            writer.add(i, row)
        writer.close()


def _bert_mlm(shared: Path, cache: Path, tmp: Path) -> WorkloadSpec:
    _shakespeare_shards(shared, tmp)
    return load_workload(
        LOCAL / "bert_tiny.yaml",
        [
            f"data.train={quoted(tmp / 'train')}",
            f"data.eval={quoted(tmp / 'eval')}",
            "data.format=parquet",
            f"data.seq_len={SEQ_LEN}",
            "model.vocab_size=500",  # shards made elsewhere come without their tokenizer
            *TINY_TRANSFORMER,
        ],
    )


def _gpt_lm(shared: Path, cache: Path, tmp: Path) -> WorkloadSpec:
    """A GPT on the same kind of shards (WordPiece ids are token ids all the same)."""
    _shakespeare_shards(shared, tmp)
    return load_workload(
        LOCAL / "gpt_tiny_zero2.yaml",
        [
            f"data.train={quoted(tmp / 'train')}",
            f"data.eval={quoted(tmp / 'eval')}",
            "data.format=parquet",
            f"data.seq_len={SEQ_LEN}",
            "model.vocab_size=500",
            *TINY_TRANSFORMER,
        ],
    )


def _bert_classifier(shared: Path, cache: Path, tmp: Path) -> WorkloadSpec:
    """fortunes.jsonl as labeled text (orch's preparation: no Ray)."""
    workload = tmp / "classifier.yaml"
    workload.write_text(
        f"name: fortunes\nmodel: {{kind: bert_classifier}}\n"
        f"data: {{train: {quoted(shared / 'fortunes.jsonl')}, format: labeled_text, "
        f"seq_len: {SEQ_LEN}, limit: 600, tokenizer: {{vocab_size: 500}}, "
        f"cache_dir: {quoted(cache)}}}\n"
    )
    return load_workload(workload, TINY_TRANSFORMER)


# A tiny Transformer, of either BERT kind.
TINY_TRANSFORMER = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_seq_len=64",
    "model.dropout=0.0",
]

# Each built-in kind, tiny, on real data that orch's preparation made (none needs Ray). Not
# resnet: a ResNet-18, the smallest, took 15-30 s to export here, and the cnn covers images.
KINDS: dict[str, Callable[[Path, Path, Path], WorkloadSpec]] = {
    "cnn": lambda shared, cache, tmp: tiny_cnn(shared, cache, tmp, "model.channels=[8, 16]"),
    "bert_mlm": _bert_mlm,
    "gpt_lm": _gpt_lm,
    "mlp": lambda shared, cache, tmp: load_workload(
        LOCAL / "tabular_mlp.yaml",
        [f"data.train={quoted(shared / 'breast_cancer.csv')}", f"data.cache_dir={quoted(cache)}"],
    ),
    "bert_classifier": _bert_classifier,
}


@pytest.fixture(scope="module")
def prepared_data(
    shared_data: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[WorkloadSpec, PreparedData]]:
    """Each kind's workload and its prepared data, made once for the module."""
    made: dict[str, tuple[WorkloadSpec, PreparedData]] = {}

    def get(kind: str) -> tuple[WorkloadSpec, PreparedData]:
        if kind not in made:
            spec = KINDS[kind](shared_data, data_cache, tmp_path_factory.mktemp(kind))
            made[kind] = (spec, prepare(spec.data))
        return made[kind]

    return get


@pytest.fixture
def built(
    prepared_data: Callable[[str], tuple[WorkloadSpec, PreparedData]], tmp_path: Path
) -> Callable[[str], tuple[Path, PreparedData]]:
    """A run directory as a run's end leaves it: orch_runs/<name>/model exported from a
    checkpoint, with model.json recording the prepared data (as the trainer writes it)."""

    def build(kind: str) -> tuple[Path, PreparedData]:
        from orchestrator.train.config import DatasetFacts
        from orchestrator.train.trainer import _data_info

        spec, prepared = prepared_data(kind)
        dataset = DatasetFacts.from_manifest(prepared.manifest)
        info = _data_info(spec, dataset)
        torch.manual_seed(0)
        weights = build_model(spec.model, info).state_dict()
        checkpoint = tmp_path / "run" / "step-00000006"
        checkpoint.mkdir(parents=True)
        torch.save({"model": weights}, checkpoint / "state.pt")
        write_manifest(str(checkpoint), Manifest(6, 0, 6, 1, None, "fp32", "hash", {}))
        meta = {
            "model": spec.model.model_dump(mode="json"),
            "data": info.__dict__,
            "kind": spec.model.kind,
            "check_data": check_data(prepared, dataset.model_dump(mode="json")),
        }
        export_checkpoint_dir(str(checkpoint), str(tmp_path / "run" / "model"), meta)
        return tmp_path / "run" / "model", prepared

    return build


# --------------------------------------------------------------------------- exports agree
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_exports_to_both_formats_within_tolerance_on_real_batches(
    built: Callable[[str], tuple[Path, PreparedData]], kind: str
) -> None:
    model_dir, prepared = built(kind)
    lines: list[str] = []
    reports = export_model(model_dir, FORMATS, log=lines.append)

    assert [r.format for r in reports] == FORMATS
    for report in reports:
        print(f"{kind} {report.line()}")  # the figures: -s shows them
        assert report.max_abs_diff <= 1e-4
        assert report.split == "eval"
        # Two batch sizes (and a shorter sequence for token models): dynamic axes.
        assert report.batches[0][0] != report.batches[1][0]
    assert len(lines) == 2 and all("max abs diff" in line for line in lines)
    records = json.loads((model_dir / EXPORTS_FILE).read_text())
    assert records["onnx"]["file"] == "model.onnx" and records["onnx"]["max_abs_diff"] <= 1e-4

    # Independently of the check: each file, loaded as its users would, on another batch shape.
    batch = _fresh_batch(kind, prepared)
    eager = load_exported(model_dir).eval()
    eager = LogitsOnly(eager) if hasattr(eager, "config") else eager
    with torch.no_grad():
        want = eager(batch)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"))
    got_onnx = torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
    got_script = torch.jit.load(str(model_dir / "model.torchscript.pt"))(batch)
    for got in (got_onnx, got_script):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


def _fresh_batch(kind: str, prepared: PreparedData) -> torch.Tensor:
    """Five eval samples at another shape than the check used (tokens: 20 long)."""
    import pyarrow.parquet as pq

    from orchestrator.data.stream import decode_images

    table = pq.read_table(prepared.files("eval")[-1]).slice(0, 5)
    if kind == "cnn":
        image = prepared.manifest["image"]
        return decode_images(
            table.column("image").to_pylist(),
            encoding=image["encoding"],
            shape=image["shape"],
            size=28,
            channels=1,
            augment=False,
            generator=torch.Generator(),
        )
    column = "features" if kind == "mlp" else "input_ids"
    rows = torch.from_numpy(np.stack(table.column(column).to_numpy(zero_copy_only=False)))
    return rows.float() if kind == "mlp" else rows[:, :20].long()


def test_an_export_over_the_tolerance_is_refused_and_not_written(
    built: Callable[[str], tuple[Path, PreparedData]],
) -> None:
    model_dir, _ = built("bert_mlm")
    with pytest.raises(ExportError, match=r"onnx export refused: .* above the tolerance 1e-30"):
        export_model(model_dir, ["onnx"], tolerance=1e-30)
    assert not (model_dir / "model.onnx").exists()
    assert not list(model_dir.glob(".*.tmp"))
    assert not (model_dir / EXPORTS_FILE).exists()


def test_the_run_end_export_refused_keeps_the_model_and_names_the_retry(
    built: Callable[[str], tuple[Path, PreparedData]],
) -> None:
    model_dir, _ = built("cnn")
    with pytest.raises(ExportError) as refused:
        export_at_end(ExportSpec(formats=["onnx"], tolerance=1e-30), str(model_dir), print, None)
    message = str(refused.value)
    assert "the fp32 model" in message and f"orch export {model_dir.parent}" in message
    assert (model_dir / "state_dict.pt").is_file() and load_exported(model_dir) is not None
    # Run again (as `orch run` of a finished run does), with a tolerance that fits: exported,
    # and a third time nothing is left to do.
    spec = ExportSpec.model_validate(["onnx", "torchscript"])
    assert [r.format for r in export_at_end(spec, str(model_dir), print, None)] == FORMATS
    assert export_at_end(spec, str(model_dir), print, None) == []


# --------------------------------------------------------------------------- the workload
def test_the_export_list_validates_in_both_forms_and_the_schema_takes_the_list(
    tmp_path: Path,
) -> None:
    base = "name: t\nmodel: {kind: cnn}\ndata: {train: data/}\n"
    listed = tmp_path / "listed.yaml"
    listed.write_text(base + "export: [onnx, torchscript]\n")
    spec = load_workload(listed)
    assert spec.export is not None and spec.export.formats == FORMATS
    assert spec.export.tolerance == 1e-4
    mapped = tmp_path / "mapped.yaml"
    mapped.write_text(base + "export: {formats: [onnx], tolerance: 1.0e-3}\n")
    assert load_workload(mapped).export == ExportSpec(formats=["onnx"], tolerance=1e-3)
    forms = workload_schema()["properties"]["export"]["anyOf"]
    assert {"type": "array", "items": {"enum": FORMATS}, "minItems": 1} in forms


BAD_WORKLOADS = [
    (
        "unknown-format",
        "model: {kind: cnn}\nexport: [onxx]\n",
        ["bad.yaml:4", "export.formats.0", "'onnx' or 'torchscript'", "'onxx'"],
    ),
    (
        "format-twice",
        "model: {kind: cnn}\nexport: [onnx, onnx]\n",
        ["bad.yaml:4", "export.formats", "lists onnx more than once"],
    ),
    (
        "custom-kind",
        "model: {kind: custom, build: 'my.models:net'}\nexport: [onnx]\n",
        ["bad.yaml:4", "export:", "a custom model cannot be exported", "bert_mlm", "cnn"],
    ),
    (
        "with-cross-validation",
        "model: {kind: cnn}\nexport: [onnx]\ncv: {folds: 3}\n",
        ["bad.yaml:4", "export:", "a cross-validation exports no model", "remove cv"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_WORKLOADS], ids=[c[0] for c in BAD_WORKLOADS]
)
def test_a_bad_export_list_exits_2_before_anything_starts(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndata: {train: data/}\n" + text)
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output


# --------------------------------------------------------------------------- orch export
def test_orch_export_writes_both_formats_and_logs_them_to_the_runs_mlflow_run(
    built: Callable[[str], tuple[Path, PreparedData]],
) -> None:
    """The run is found by its name in the default store ($MLFLOW_TRACKING_URI: the session's
    store, set by conftest)."""
    from mlflow.tracking import MlflowClient

    model_dir, _ = built("cnn")
    client = MlflowClient()
    experiment = client.create_experiment(f"exports-{model_dir.parent.parent.name}")
    run_id = client.create_run(experiment, tags={"orch.run_name": "run"}).info.run_id

    argv = ["export", str(model_dir.parent), "--format", "onnx", "-f", "torchscript"]
    result = CliRunner().invoke(app, argv)

    assert result.exit_code == 0, result.output
    assert re.search(r"onnx: .*model\.onnx \(max abs diff [0-9.e+-]+ vs eager", result.output)
    assert "torchscript: " in result.output and f"MLflow run {run_id}" in result.output
    logged = {a.path for a in client.list_artifacts(run_id, "model_export")}
    names = ("model.onnx", "model.torchscript.pt", EXPORTS_FILE)
    assert logged == {f"model_export/{n}" for n in names}
    assert client.get_run(run_id).data.metrics["export_onnx_max_abs_diff"] <= 1e-4
    client.delete_run(run_id)  # the next test's run of the same name is the only one


def test_orch_export_over_the_tolerance_exits_2(
    built: Callable[[str], tuple[Path, PreparedData]],
) -> None:
    model_dir, _ = built("bert_mlm")
    argv = ["export", str(model_dir), "-f", "onnx", "--tolerance", "0", "--no-tracking"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "onnx export refused" in result.output and "above the tolerance 0" in result.output
    assert not (model_dir / "model.onnx").exists()


def test_orch_export_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "orch_runs" / "unfinished"
    (empty / "step-00000002").mkdir(parents=True)
    result = runner.invoke(app, ["export", str(empty), "-f", "onnx"])
    assert result.exit_code == 2
    assert f"{empty}: no exported model here (no model/model.json)" in result.output

    result = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "-f", "onnx"])
    assert result.exit_code == 2 and "no such run directory" in result.output

    result = runner.invoke(app, ["export", str(empty), "--format", "tflite"])
    assert result.exit_code == 2
    assert "'tflite' is not one of" in result.output and "'onnx', 'torchscript'" in result.output

    with pytest.raises(ExportError, match="unknown export format tflite; allowed: onnx, "):
        orchestrator.export(empty, ["tflite"])

    # A model exported before model.json recorded the run's data: nothing real to check on.
    older = tmp_path / "orch_runs" / "older" / "model"
    older.mkdir(parents=True)
    (older / "model.json").write_text(json.dumps({"model": {"kind": "cnn"}, "data": {}}))
    result = runner.invoke(app, ["export", str(older.parent), "-f", "onnx"])
    assert result.exit_code == 2
    assert "does not say where the run's data is (check_data)" in result.output

    custom = tmp_path / "orch_runs" / "mine" / "model"
    custom.mkdir(parents=True)
    meta = {"model": {"kind": "custom", "build": "my.models:net"}, "data": {}}
    (custom / "model.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["export", str(custom.parent), "-f", "torchscript"])
    assert result.exit_code == 2
    assert (
        f"{custom / 'model.json'}: model.kind: a custom model cannot be exported" in result.output
    )


def test_the_api_function_is_exported() -> None:
    assert orchestrator.export is orchestrator.api.export
    assert "export" in orchestrator.__all__ and "ExportError" in orchestrator.__all__
