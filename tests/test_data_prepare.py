"""Preparing real and generated sources into cached Parquet shards, on a real local Ray."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from orchestrator.data import DataError, prepare
from orchestrator.data.stream import decode_images
from orchestrator.spec import DataSpec

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def shakespeare(shared_data: Path, tmp_path: Path, **kw: object) -> DataSpec:
    settings = {
        "train": str(shared_data / "tinyshakespeare.txt"),
        "tokenizer": {"kind": "wordpiece", "vocab_size": 500},
        "seq_len": 32,
        "limit": 3000,
        "cache_dir": str(tmp_path / "cache"),
        "shard_rows": 256,
    }
    return DataSpec.model_validate(settings | kw)


def all_rows(prepared, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in prepared.files(split)])


def test_text_corpus_is_tokenized_packed_and_split(shared_data: Path, tmp_path: Path) -> None:
    prepared = prepare(shakespeare(shared_data, tmp_path))
    m = prepared.manifest
    assert m["kind"] == "text" and m["seq_len"] == 32
    train, evals = all_rows(prepared, "train"), all_rows(prepared, "eval")
    assert train.num_rows == m["splits"]["train"]["rows"] > 500
    assert 0 < evals.num_rows == m["splits"]["eval"]["rows"] < train.num_rows * 0.15
    assert len(m["splits"]["train"]["shards"]) == -(-train.num_rows // 256)  # shard_rows honoured
    assert m["splits"]["train"]["tokens"] == train.num_rows * 32
    assert train.schema.field("input_ids").type == pa.list_(pa.int32(), 32)
    ids = set(train["sample_id"].to_pylist())
    assert ids.isdisjoint(evals["sample_id"].to_pylist())  # no sample in both splits
    tok = Tokenizer.from_file(f"{prepared.root}/tokenizer.json")
    assert m["tokenizer"]["vocab_size"] == tok.get_vocab_size() == 500
    both = pa.concat_tables([train, evals]).sort_by("sample_id")
    seq = both["input_ids"][0].as_py()
    assert seq[0] == m["tokenizer"]["cls_id"] and seq[-1] == m["tokenizer"]["sep_id"]
    text = tok.decode(seq)
    assert "citizen" in text  # the corpus opens with "First Citizen:"


def test_an_eval_source_leaves_every_training_record_in_train(
    shared_data: Path, tmp_path: Path
) -> None:
    """data.eval replaces the held-out share (eval_fraction applies only when eval is null)."""
    split = prepare(shakespeare(shared_data, tmp_path))
    held = split.manifest["splits"]
    (tmp_path / "eval.txt").write_text("A short play, for evaluation only.\n" * 40)
    given = prepare(shakespeare(shared_data, tmp_path, eval=str(tmp_path / "eval.txt")))
    rows = {s: given.manifest["splits"][s]["rows"] for s in ("train", "eval")}
    assert rows["train"] == held["train"]["rows"] + held["eval"]["rows"]
    assert 0 < rows["eval"] < 40  # the eval file's own sequences, and nothing else
    # Images alike: 20 training images, a separate eval folder of 4.
    from PIL import Image

    for folder, count in (("imgs", 10), ("eval_imgs", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / folder / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8)).save(tmp_path / folder / cls / f"{i}.png")
    images = prepare(
        DataSpec(
            train=str(tmp_path / "imgs"),
            eval=str(tmp_path / "eval_imgs"),
            eval_fraction=0.5,
            cache_dir=str(tmp_path / "c"),
        )
    )
    assert {s: images.manifest["splits"][s]["rows"] for s in ("train", "eval")} == {
        "train": 20,
        "eval": 4,
    }


def test_cache_is_reused_and_keyed_by_everything_that_matters(
    shared_data: Path, tmp_path: Path
) -> None:
    spec = shakespeare(shared_data, tmp_path)
    first = prepare(spec)
    manifest = Path(first.root).parent / "manifest.json"  # beside the attempt it names
    stamp = manifest.stat().st_mtime_ns
    again = prepare(spec)
    assert again.root == first.root
    assert manifest.stat().st_mtime_ns == stamp  # not rebuilt
    roots = {first.root}
    for change in (
        {"tokenizer": {"kind": "wordpiece", "vocab_size": 600}},
        {"tokenizer": {"kind": "bpe", "vocab_size": 500}},
        {"seq_len": 64},
        {"eval_fraction": 0.1},
        {"limit": 2000},
    ):
        other = prepare(shakespeare(shared_data, tmp_path, **change))
        assert other.root not in roots, change
        roots.add(other.root)


def test_changed_source_is_never_reused(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    spec = DataSpec(
        train=str(corpus), seq_len=16, cache_dir=str(tmp_path / "c"), tokenizer={"vocab_size": 100}
    )
    first = prepare(spec)
    corpus.write_text("a completely different text about cats and mice\n" * 400)
    second = prepare(spec)
    assert second.root != first.root
    tok = Tokenizer.from_file(f"{second.root}/tokenizer.json")
    assert "cats" in tok.decode(all_rows(second, "train")["input_ids"][0].as_py())


def test_interrupted_preparation_is_rebuilt(shared_data: Path, tmp_path: Path) -> None:
    spec = shakespeare(shared_data, tmp_path)
    first = prepare(spec)
    (Path(first.root).parent / "manifest.json").unlink()  # as if killed before it was written
    (Path(first.root) / "train" / "part-00000.parquet").write_bytes(b"half a file")
    rebuilt = prepare(spec)
    assert rebuilt.root != first.root  # the unfinished attempt is never used
    assert all_rows(rebuilt, "train").num_rows == first.manifest["splits"]["train"]["rows"]


def test_split_is_deterministic(shared_data: Path, tmp_path: Path) -> None:
    a = prepare(shakespeare(shared_data, tmp_path / "a"))
    b = prepare(shakespeare(shared_data, tmp_path / "b"))
    assert all_rows(a, "eval").equals(all_rows(b, "eval"))
    assert all_rows(a, "train").equals(all_rows(b, "train"))


def test_jsonl_and_parquet_text_with_bpe(tmp_path: Path) -> None:
    docs = [f"document {i} says hello to the orchestrator number {i * 7}" for i in range(300)]
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": docs}), tmp_path / "p" / "a.parquet")
    results = []
    for source in ("j/*.jsonl", "p/"):
        spec = DataSpec(
            train=str(tmp_path / source),
            text_column="body",
            seq_len=16,
            tokenizer={"kind": "bpe", "vocab_size": 300},
            cache_dir=str(tmp_path / "cache"),
        )
        prepared = prepare(spec)
        assert prepared.manifest["format"] in ("jsonl", "parquet")
        tok = Tokenizer.from_file(f"{prepared.root}/tokenizer.json")
        results.append(tok.decode(all_rows(prepared, "train")["input_ids"][0].as_py()))
    assert results[0] == results[1]
    assert results[0].startswith("document 0 says hello")


def test_mnist_idx_files(shared_data: Path, tmp_path: Path) -> None:
    spec = DataSpec(
        train=str(shared_data),
        format="mnist",
        limit=1000,
        eval_fraction=0.2,
        cache_dir=str(tmp_path),
    )
    prepared = prepare(spec)
    image = prepared.manifest["image"]
    assert image == {
        "encoding": "raw",
        "shape": [28, 28, 1],
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
    }
    train, evals = all_rows(prepared, "train"), all_rows(prepared, "eval")
    assert train.num_rows + evals.num_rows == 1000
    assert 120 < evals.num_rows < 280
    labels = train["label"].to_numpy()
    assert labels.min() == 0 and labels.max() == 9
    assert train["label"][0].as_py() == 7  # the first t10k image is a 7
    pixels = decode_images(
        train["image"].to_pylist()[:4],
        encoding="raw",
        shape=[28, 28, 1],
        size=28,
        channels=1,
        augment=False,
        generator=torch.Generator(),
    )
    assert pixels.shape == (4, 1, 28, 28) and 0.0 <= pixels.min() < pixels.max() <= 1.0


def test_cifar_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "cifar"
    src.mkdir()
    for name, n in (("data_batch_1", 60), ("data_batch_2", 40), ("test_batch", 30)):
        batch = {
            b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        (src / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [b"c%d" % i for i in range(10)]}
    (src / "batches.meta").write_bytes(pickle.dumps(meta))
    prepared = prepare(DataSpec(train=str(src), cache_dir=str(tmp_path / "c")))
    assert prepared.manifest["format"] == "cifar"
    assert prepared.manifest["splits"]["train"]["rows"] == 100  # test_batch is the eval split
    assert prepared.manifest["splits"]["eval"]["rows"] == 30
    assert prepared.manifest["image"]["shape"] == [32, 32, 3]
    assert prepared.manifest["image"]["class_names"][3] == "c3"


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    src = tmp_path / "cifar"
    src.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (src / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR python batch: refusing"):
        prepare(DataSpec(train=str(src), cache_dir=str(tmp_path / "c")))


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    prepared = prepare(
        DataSpec(
            train=str(tmp_path / "imgs"),
            eval_fraction=0.0,
            cache_dir=str(tmp_path / "c"),
            augment=True,
        )
    )
    assert prepared.manifest["format"] == "image_folder"
    assert prepared.manifest["image"]["class_names"] == ["cat", "dog"]
    rows = all_rows(prepared, "train")
    assert rows.num_rows == 20 and sorted(set(rows["label"].to_pylist())) == [0, 1]
    batch = decode_images(
        rows["image"].to_pylist(),
        encoding="encoded",
        shape=None,
        size=16,
        channels=3,
        augment=True,
        generator=torch.Generator(),
    )
    assert batch.shape == (20, 3, 16, 16)


# --------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file or directory"):
        prepare(DataSpec(train=str(tmp_path / "nope.txt"), cache_dir=str(tmp_path)))


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\*\.txt: no files found"):
        prepare(DataSpec(train=str(tmp_path / "*.txt"), cache_dir=str(tmp_path)))


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: the corpus is empty"):
        prepare(DataSpec(train=str(tmp_path / "empty.txt"), cache_dir=str(tmp_path)))


def test_corpus_too_small_for_one_sequence(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    with pytest.raises(DataError, match=r"tiny\.txt: the corpus yields no full sequence"):
        prepare(
            DataSpec(
                train=str(tmp_path / "tiny.txt"),
                seq_len=512,
                tokenizer={"vocab_size": 100},
                cache_dir=str(tmp_path),
            )
        )


def test_bad_jsonl_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        prepare(DataSpec(train=str(tmp_path / "a.jsonl"), cache_dir=str(tmp_path)))


def test_jsonl_without_text_field(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "fine"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: no string field 'text'"):
        prepare(DataSpec(train=str(tmp_path / "a.jsonl"), cache_dir=str(tmp_path)))


def test_mnist_label_out_of_range(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    images = struct.pack(">HBBIII", 0, 8, 3, 3, 28, 28) + bytes(3 * 28 * 28)
    labels = struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 12, 3])
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (tmp_path / "m" / "train-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 12 is out of range"):
        prepare(DataSpec(train=str(tmp_path / "m"), cache_dir=str(tmp_path)))


def test_mnist_truncated_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 8, 3, 5, 28, 28))
    labels = struct.pack(">HBBI", 0, 8, 1, 5) + bytes(5)
    (tmp_path / "m" / "x-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DataError, match=r"x-images-idx3-ubyte: header says \(5, 28, 28\)"):
        prepare(DataSpec(train=str(tmp_path / "m"), cache_dir=str(tmp_path)))


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "a.dat").write_text("x\n")
    with pytest.raises(DataError, match=r"cannot tell the format.*set data\.format to one of"):
        prepare(DataSpec(train=str(tmp_path / "a.dat"), cache_dir=str(tmp_path)))
    # A .csv is a table now (format: tabular): one without the label column says which it lacks.
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match=r"a\.csv: no label column 'label' \(data\.label_column\)"):
        prepare(DataSpec(train=str(tmp_path / "a.csv"), cache_dir=str(tmp_path)))


def test_a_table_in_parquet_read_as_text_names_its_columns_and_the_format(
    tmp_path: Path,
) -> None:
    """format auto takes .parquet for text; pyarrow's answer to the missing column was a bare
    IndexError."""
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": [0, 1]}), tmp_path / "t.parquet")
    with pytest.raises(
        DataError,
        match=r"t\.parquet: no text column 'text' \(data\.text_column\); the columns are: "
        r"x, label\. A table of features and a label is data\.format: tabular",
    ):
        prepare(DataSpec(train=str(tmp_path / "t.parquet"), cache_dir=str(tmp_path / "c")))


def test_cli_reports_data_errors_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    (tmp_path / "w.yaml").write_text(
        f"name: t\nmodel: {{kind: bert_mlm}}\ndata: {{train: {tmp_path / 'missing.txt'}}}\n"
    )
    result = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "w.yaml")])
    assert result.exit_code == 2
    assert "missing.txt: no such file or directory" in result.output
    assert "Traceback" not in result.output


def test_existing_tokenizer_file(shared_data: Path, tmp_path: Path) -> None:
    first = prepare(shakespeare(shared_data, tmp_path))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(Path(first.root, "tokenizer.json").read_text())
    spec = shakespeare(shared_data, tmp_path, tokenizer={"kind": "file", "path": str(tokenizer)})
    reused = prepare(spec)
    assert reused.root != first.root
    assert reused.manifest["tokenizer"]["hash"] == first.manifest["tokenizer"]["hash"]
    assert all_rows(reused, "train").equals(all_rows(first, "train"))
    # Another file at the same path is another tokenizer: a new cache entry, never a stale one.
    other = Tokenizer.from_file(str(tokenizer))
    other.add_tokens(["thou-art-new"])
    other.save(str(tokenizer))
    assert prepare(spec).root != reused.root
    tokenizer.write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer\.json: cannot load tokenizer"):
        prepare(spec)


@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_missing_source_is_refused_before_ray_starts(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting Ray takes seconds; a path typo is found without it."""
    from typer.testing import CliRunner

    import orchestrator.driver
    import orchestrator.ray_session
    from orchestrator.cli import app

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a workload whose data is missing")

    # Where `orch run` and `orch tune` take their Ray session from.
    monkeypatch.setattr(orchestrator.driver, "ray_session", no_ray)
    monkeypatch.setattr(orchestrator.ray_session, "ray_session", no_ray)
    tune = "tune: {space: {train.optimizer.lr: {grid: [0.1]}}}\n" if command == "tune" else ""
    missing = tmp_path / "no-such-dir" / "missing.txt"
    (tmp_path / "w.yaml").write_text(
        f"name: t\nmodel: {{kind: bert_mlm}}\ndata: {{train: {missing}}}\n" + tune
    )
    result = CliRunner().invoke(app, [command, str(tmp_path / "w.yaml"), "--no-tracking"])
    assert result.exit_code == 2, result.output
    assert "missing.txt: no such file or directory" in result.output
    assert "Traceback" not in result.output
