"""Labeled text and the bert_classifier kind: preparation, labels, padding, pretrained encoders,
and bad input (exit 2, before training). No Ray: labeled text is prepared on the driver."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from builders import SHARED_DATA
from tokenizers import Tokenizer
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.data import DataError, prepare
from orchestrator.data.shards import held_out
from orchestrator.models import DataInfo, ModelError, build_model, input_example, load_exported
from orchestrator.spec import DataSpec
from orchestrator.train.checkpoint import Manifest, export_model, write_manifest

FORTUNES = SHARED_DATA / "fortunes.jsonl"
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 32, "dropout": 0.0}
RECORDS = [
    {"text": "the cat sat on the mat", "label": "animals"},
    {"text": "stocks fell sharply today", "label": "money"},
    {"text": "a dog chased the ball", "label": "animals"},
    {"text": "the bank raised its rates " * 10, "label": "money"},  # longer than seq_len
    {"text": "birds sing in the morning", "label": "animals"},
    {"text": "bonds and shares and gold", "label": "money"},
]


def _spec(tmp_path: Path, train: Path, **kw: object) -> DataSpec:
    settings = {
        "train": str(train),
        "format": "labeled_text",
        "tokenizer": {"kind": "wordpiece", "vocab_size": 100},
        "seq_len": 16,
        "eval_fraction": 0.34,
        "cache_dir": str(tmp_path / "cache"),
    }
    return DataSpec.model_validate(settings | kw)


def _rows(prepared, split: str) -> list[dict]:
    return pa.concat_tables(pq.read_table(f) for f in prepared.files(split)).to_pylist()


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_labeled_jsonl_is_framed_padded_and_split_by_sample_id(tmp_path: Path) -> None:
    prepared = prepare(_spec(tmp_path, _jsonl(tmp_path / "t.jsonl", RECORDS)))
    m = prepared.manifest
    assert m["kind"] == "labeled_text" and m["format"] == "labeled_text" and m["seq_len"] == 16
    assert m["labels"] == {
        "column": "label",
        "num_classes": 2,
        "names": ["animals", "money"],
        "counts": [3, 3],
    }
    assert m["truncated"] == 1
    tok = m["tokenizer"]
    train, evals = _rows(prepared, "train"), _rows(prepared, "eval")
    assert {r["sample_id"] for r in evals} == {i for i in range(6) if held_out(i, 0.34)} != set()
    assert len(train) + len(evals) == 6
    tokenizer = Tokenizer.from_file(f"{prepared.root}/tokenizer.json")
    for row in sorted(train + evals, key=lambda r: r["sample_id"]):
        ids, record = row["input_ids"], RECORDS[row["sample_id"]]
        assert len(ids) == 16 and ids[0] == tok["cls_id"]
        assert row["label"] == ["animals", "money"].index(record["label"])
        body = ids[1 : ids.index(tok["sep_id"])]
        assert all(i == tok["pad_id"] for i in ids[len(body) + 2 :])  # padding after [SEP]
        if row["sample_id"] != 3:
            assert tokenizer.decode(body) == record["text"]
        else:  # cut to seq_len, [SEP] kept last
            assert len(body) == 14 and ids[-1] == tok["sep_id"]


def test_csv_and_parquet_give_the_jsonl_shards(tmp_path: Path) -> None:
    first = prepare(_spec(tmp_path, _jsonl(tmp_path / "t.jsonl", RECORDS)))
    # One tokenizer for all three: WordPiece training may break ties its own way each time.
    tokenizer = {"kind": "file", "path": f"{first.root}/tokenizer.json"}
    expected = _rows(first, "train")
    table = pa.Table.from_pylist(RECORDS)
    pacsv.write_csv(table, tmp_path / "t.csv")
    pq.write_table(table, tmp_path / "t.parquet")
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        prepared = prepare(_spec(tmp_path, path, tokenizer=tokenizer))
        assert _rows(prepared, "train") == expected, path.name


def test_labels_are_numbered_in_sorted_order(tmp_path: Path) -> None:
    labels = [10, 2, "b", "a", 2, 10]  # integers numerically, before names
    records = [{"text": f"text number {i}", "label": lab} for i, lab in enumerate(labels)]
    prepared = prepare(_spec(tmp_path, _jsonl(tmp_path / "t.jsonl", records), eval_fraction=0))
    names = prepared.manifest["labels"]["names"]
    assert names == ["2", "10", "a", "b"]
    got = {r["sample_id"]: r["label"] for r in _rows(prepared, "train")}
    assert [names[got[i]] for i in range(6)] == [str(lab) for lab in labels]


def test_a_separate_eval_file_and_a_tokenizer_file(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "train.jsonl", RECORDS)
    first = prepare(_spec(tmp_path, train, eval_fraction=0))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(Path(first.root, "tokenizer.json").read_text())
    evals = _jsonl(tmp_path / "eval.jsonl", [{"text": "cat and dog", "label": "pets"}])
    spec = _spec(
        tmp_path, train, eval=str(evals), tokenizer={"kind": "file", "path": str(tokenizer)}
    )
    prepared = prepare(spec)
    assert prepared.manifest["tokenizer"]["hash"] == first.manifest["tokenizer"]["hash"]
    assert prepared.manifest["labels"]["names"] == ["animals", "money", "pets"]
    (row,) = _rows(prepared, "eval")
    assert row["sample_id"] == 6 and row["label"] == 2


def test_fortunes_prepare_into_eight_classes(tmp_path: Path) -> None:
    if not FORTUNES.is_file():
        pytest.skip(f"real test data not found at {FORTUNES}")
    prepared = prepare(_spec(tmp_path, FORTUNES, seq_len=64, eval_fraction=0.2, limit=800))
    labels = prepared.manifest["labels"]
    assert labels["num_classes"] == 8 and labels["names"][0] == "computers"
    assert sum(labels["counts"]) == 800


# --------------------------------------------------------------------------- the model
def _classifier(**kw: object) -> dict:
    return {"kind": "bert_classifier", **TINY, **kw}


INFO = DataInfo(vocab_size=60, num_classes=3, pad_id=0, seq_len=12)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_is_masked(pooling: str) -> None:
    torch.manual_seed(0)
    model = build_model(_classifier(pooling=pooling), INFO).eval()
    short = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0]])
    longer = torch.cat([short, torch.zeros(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(short)
        assert logits.shape == (1, 3)
        assert torch.allclose(logits, model(longer), atol=1e-5)  # more padding, same answer
        # ... which it would not be if the padded positions were attended to.
        unmasked = model.bert(short).last_hidden_state[:, 0]
        masked = model.bert(short, attention_mask=(short != 0).long()).last_hidden_state[:, 0]
        assert not torch.allclose(unmasked, masked, atol=1e-3)


def test_input_example_is_one_sample_of_seq_len_token_ids() -> None:
    example = input_example(_classifier(), INFO)
    assert example.shape == (1, 12) and example.dtype.name == "int64"
    assert (example != INFO.pad_id).all()
    assert build_model(_classifier(), INFO)(torch.from_numpy(example)).shape == (1, 3)


def test_classifier_needs_labeled_data() -> None:
    with pytest.raises(ModelError, match=r"labeled text \(data.format: labeled_text\)"):
        build_model(_classifier(), DataInfo(vocab_size=60))


def _orch_export(tmp_path: Path, spec: dict, info: DataInfo) -> tuple[Path, torch.nn.Module]:
    """An export as a run writes it: a plain-DDP checkpoint, consolidated by export_model."""
    model = build_model(spec, info)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, checkpoint / "state.pt")
    write_manifest(str(checkpoint), Manifest(6, 0, 6, 1, None, "fp32", "hash", {}))
    meta = {"model": spec, "data": info.__dict__, "kind": spec["kind"], "task": "masked_lm"}
    return Path(export_model(str(checkpoint), str(tmp_path / "model"), meta)), model


def test_encoder_loads_from_an_orch_mlm_export(tmp_path: Path) -> None:
    mlm_spec = {"kind": "bert_mlm", **TINY}
    export, mlm = _orch_export(tmp_path, mlm_spec, DataInfo(vocab_size=60))
    torch.manual_seed(1)
    model = build_model(_classifier(pretrained=str(export)), INFO)
    encoder = {k.removeprefix("bert."): v for k, v in mlm.state_dict().items()}
    for name, value in model.bert.state_dict().items():
        assert torch.equal(value, encoder[name]), name
    assert not any(k.startswith("cls.") for k in model.state_dict())  # the MLM head is dropped
    # The classifier's own export loads back whole, by load_exported, with its data facts.
    own, _ = _orch_export(tmp_path / "own", _classifier(), INFO)
    reloaded = load_exported(own).eval()
    assert reloaded(torch.from_numpy(input_example(_classifier(), INFO))).shape == (1, 3)


def test_encoder_loads_from_a_save_pretrained_directory(tmp_path: Path) -> None:
    mlm = build_model({"kind": "bert_mlm", **TINY}, DataInfo(vocab_size=60))
    mlm.save_pretrained(tmp_path / "hf")
    model = build_model(_classifier(pretrained=str(tmp_path / "hf")), INFO)
    assert torch.equal(
        model.bert.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight
    )


def test_pretrained_that_does_not_fit_names_both(tmp_path: Path) -> None:
    export, _ = _orch_export(tmp_path, {"kind": "bert_mlm", **TINY}, DataInfo(vocab_size=60))
    with pytest.raises(ModelError) as error:
        build_model(_classifier(pretrained=str(export), hidden_size=64, num_layers=2), INFO)
    message = str(error.value)
    assert f"model.pretrained: {export} does not fit this model" in message
    assert "hidden_size 32 there, 64 here; num_layers 1 there, 2 here" in message
    assert "set model.hidden_size: 32, model.num_layers: 1" in message
    bigger_vocab = DataInfo(vocab_size=70, num_classes=3, pad_id=0)
    with pytest.raises(ModelError, match=r"vocab_size 60 there, 70 here.*tokenizer\.json"):
        build_model(_classifier(pretrained=str(export)), bigger_vocab)
    cnn, _ = _orch_export(tmp_path / "cnn", {"kind": "cnn"}, DataInfo(num_classes=10))
    with pytest.raises(ModelError, match=r"an export of a cnn model.*bert_mlm or bert_classifier"):
        build_model(_classifier(pretrained=str(cnn)), INFO)
    with pytest.raises(ModelError, match=r"neither an orch model export .* nor a save_pretrained"):
        build_model(_classifier(pretrained=str(tmp_path)), INFO)


# --------------------------------------------------------------------------- bad input
def _workload(tmp_path: Path, train: Path, model: str = "kind: bert_classifier") -> Path:
    path = tmp_path / "w.yaml"
    path.write_text(
        f"name: t\nmodel: {{{model}, hidden_size: 32, num_layers: 1, num_heads: 2}}\n"
        f"data: {{train: {json.dumps(str(train))}, format: labeled_text, seq_len: 16, "
        f"cache_dir: {json.dumps(str(tmp_path / 'cache'))}, "
        "tokenizer: {kind: wordpiece, vocab_size: 100}}\n"
    )
    return path


BAD_DATA = [
    ("missing-label-key", "t.jsonl", '{"text": "a b"}\n', ["t.jsonl:1", "no label in 'label'"]),
    (
        "missing-label-column",
        "t.csv",
        "text,category\nhello,x\n",
        ["t.csv:1", "no column 'label' (data.label_column)", "['text', 'category']"],
    ),
    (
        "one-class",
        "t.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n',
        ["every record has the label 'x'", "at least two classes"],
    ),
    (
        "not-utf8",
        "t.jsonl",
        b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n',
        ["t.jsonl:2: not UTF-8 text"],
    ),
    (
        "empty-text",
        "t.csv",
        'text,label\nfine,x\n"  ",y\n',
        ["t.csv:3", "the text ('text', data.text_column) is empty"],
    ),
    (
        "label-a-fraction",
        "t.jsonl",
        '{"text": "a", "label": 1.5}\n',
        ["t.jsonl:1", "label 1.5", "names (strings) or integers"],
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "expected"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_labeled_text_exits_2_naming_file_and_line(
    tmp_path: Path, name: str, content: str | bytes, expected: list[str]
) -> None:
    source = tmp_path / name
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        source.write_text(content)
    result = CliRunner().invoke(app, ["data", "prepare", str(_workload(tmp_path, source))])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in [str(source), *expected]:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"
    with pytest.raises(DataError):  # and the same through the API, as DataError
        prepare(_spec(tmp_path, source))


BAD_SPECS = [
    (
        "mlm-on-labeled-text",
        "name: t\nmodel: {kind: bert_mlm}\ndata: {train: x.jsonl, format: labeled_text}\n",
        ["data.format", "bert_mlm trains on text, not labeled_text labeled text"],
    ),
    (
        "classifier-on-plain-text",
        "name: t\nmodel: {kind: bert_classifier}\ndata: {train: x.jsonl, format: jsonl}\n",
        [
            "data.format",
            "bert_classifier trains on labeled text, not jsonl text",
            "use data.format: labeled_text",
        ],
    ),
    (
        "pretrained-with-a-new-tokenizer",
        "name: t\nmodel: {kind: bert_classifier, pretrained: runs/p/model}\n"
        "data: {train: x.jsonl, format: labeled_text}\n",
        [
            "data.tokenizer.kind",
            "{kind: file, path: runs/p/model/tokenizer.json}",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_text_classifier_specs_exit_2(tmp_path: Path, text: str, expected: list[str]) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"


def test_run_refuses_a_classifier_on_auto_jsonl_before_ray_starts(tmp_path: Path) -> None:
    workload = _workload(tmp_path, _jsonl(tmp_path / "t.jsonl", RECORDS))
    result = CliRunner().invoke(app, ["run", str(workload), "--set", "data.format=auto"])
    assert result.exit_code == 2, result.output
    assert "reads as jsonl: bert_classifier trains on labeled text, not jsonl text" in result.output
    assert "use data.format: labeled_text" in result.output
