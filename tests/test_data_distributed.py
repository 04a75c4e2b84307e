"""Preparation spread over Ray Data tasks: text chunks and image folders, on a real local Ray.

Each test cuts its data into several tasks (small `chunk_mb` / `shard_rows`) and checks the
result against the same work done task by task in this process: the cluster's scheduling
must not change a single row.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from orchestrator.data import DataError, prepare
from orchestrator.data.formats import FORMATS
from orchestrator.data.sources import find_source
from orchestrator.data.text import CHUNK_ID_BITS, TextJob, prepare_chunk
from orchestrator.spec import DataSpec

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def rows(root: str, shards: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f"{root}/{name}") for name in shards])


def test_text_in_parallel_chunks_equals_the_chunks_one_by_one(
    shared_data: Path, tmp_path: Path
) -> None:
    corpus = shared_data / "tinyshakespeare.txt"
    data = DataSpec(
        train=str(corpus),
        tokenizer={"kind": "wordpiece", "vocab_size": 500},
        seq_len=32,
        shard_rows=512,
        chunk_mb=0.25,
        cache_dir=str(tmp_path / "cache"),
    )
    prepared = prepare(data)
    m = prepared.manifest
    chunks = FORMATS["text"].chunks(find_source(str(corpus)), int(0.25 * 2**20), 0)  # type: ignore[union-attr]
    assert m["chunks"] == len(chunks) == 5 and sum(m["chunks_by_node"].values()) == 5
    # The same chunks, written one after another in this process with the same tokenizer.
    here = tmp_path / "by-hand"
    job = TextJob(
        "text", "text", 32, 512, data.eval_fraction, prepared.tokenizer_json() or "",
        pafs.LocalFileSystem(), pafs.LocalFileSystem(), str(here),
    )  # fmt: skip
    reports = [prepare_chunk(chunk, job) for chunk in chunks]
    for split in ("train", "eval"):
        ours = rows(prepared.root, m["splits"][split]["shards"])
        expected = rows(str(here), [n for r in reports for n in r[split]["shards"]])
        assert ours.equals(expected), split
        assert m["splits"][split]["rows"] == ours.num_rows
    ids = np.concatenate([rows(prepared.root, m["splits"][s]["shards"])["sample_id"].to_numpy()
                          for s in ("train", "eval")])  # fmt: skip
    assert len(set(ids.tolist())) == len(ids)
    assert sorted(set((ids >> CHUNK_ID_BITS).tolist())) == [0, 1, 2, 3, 4]
    # One chunk holding the whole corpus loses only the chunks' cut-off tails: a few rows.
    whole = prepare(data.model_copy(update={"chunk_mb": 64.0}))
    assert whole.manifest["chunks"] == 1
    total = m["splits"]["train"]["rows"] + m["splits"]["eval"]["rows"]
    whole_total = (
        whole.manifest["splits"]["train"]["rows"] + whole.manifest["splits"]["eval"]["rows"]
    )
    assert whole_total - 5 <= total <= whole_total


def test_a_task_s_bad_line_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a line of good text\n" * 3000 + b"caf\xe9\n" + b"more text\n" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as caught:
        prepare(DataSpec(train=str(corpus), chunk_mb=0.01, cache_dir=str(cache)))
    assert str(caught.value) == f"{corpus}:3001: not UTF-8 text"
    assert [p.name for p in cache.glob("*/attempt-*")] == []


# --------------------------------------------------------------------------- image folders
def jpeg(rng: np.random.Generator, size: int = 12) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def image_folder(root: Path, classes: dict[str, int], seed: int = 0) -> dict[str, str]:
    """Class folders of small JPEGs; returns {image bytes' key: class} to check labels by."""
    rng = np.random.default_rng(seed)
    truth = {}
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            body = jpeg(rng)
            (root / cls / f"img_{i:03d}.JPEG").write_bytes(body)
            truth[body.hex()[-64:]] = cls
    return truth


def test_image_folder_in_parallel_batches(tmp_path: Path) -> None:
    # "a-x" sorts after "a" by name, but "a-x/..." before "a/..." by path: the classes are
    # numbered by name.
    truth = image_folder(tmp_path / "train", {"b": 20, "a-x": 15, "a": 25})
    eval_truth = image_folder(tmp_path / "val", {"a": 3, "b": 4}, seed=1)
    (tmp_path / "train" / "notes.txt").write_text("not an image, ignored\n")
    prepared = prepare(
        DataSpec(
            train=str(tmp_path / "train"),
            eval=str(tmp_path / "val"),
            format="image_folder",  # named: the notes file leaves the guess unsure
            shard_rows=16,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    m = prepared.manifest
    names = m["image"]["class_names"]
    assert names == ["a", "a-x", "b"] and m["image"]["num_classes"] == 3
    train = rows(prepared.root, m["splits"]["train"]["shards"])
    evals = rows(prepared.root, m["splits"]["eval"]["shards"])
    assert train.num_rows == 60 and evals.num_rows == 7  # every training image trains
    assert len(m["splits"]["train"]["shards"]) >= 4  # several tasks wrote them
    for table, expected in ((train, truth), (evals, eval_truth)):
        got = {
            img.hex()[-64:]: names[label]
            for img, label in zip(
                table["image"].to_pylist(), table["label"].to_pylist(), strict=True
            )
        }
        assert got == expected
    all_ids = train["sample_id"].to_pylist() + evals["sample_id"].to_pylist()
    assert sorted(all_ids) == list(range(67))


def test_image_folder_bad_input(tmp_path: Path) -> None:
    image_folder(tmp_path / "train", {"cat": 5, "dog": 5})
    cache = str(tmp_path / "cache")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"train/empty: class folder without images"):
        prepare(DataSpec(train=str(tmp_path / "train"), cache_dir=cache))
    (tmp_path / "train" / "empty").rmdir()
    broken = tmp_path / "train" / "dog" / "img_002.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])  # cut short, as a failed copy leaves it
    with pytest.raises(DataError, match=r"dog/img_002\.JPEG: not a readable image .*skip_bad"):
        prepare(DataSpec(train=str(tmp_path / "train"), cache_dir=cache))
    skipped = prepare(
        DataSpec(train=str(tmp_path / "train"), cache_dir=cache, skip_bad_images=True)
    ).manifest
    assert skipped["skipped_images"] == {"count": 1, "first": [str(broken)]}
    assert skipped["splits"]["train"]["rows"] + skipped["splits"]["eval"]["rows"] == 9


def test_a_flat_eval_folder_with_a_label_file(tmp_path: Path) -> None:
    image_folder(tmp_path / "train", {"n01": 4, "n02": 4})
    rng = np.random.default_rng(3)
    val = tmp_path / "val"
    val.mkdir()
    for i in range(3):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(rng))
    labels = tmp_path / "LOC_val_solution.csv"
    # ImageNet's own layout: a header, the image's stem, the class first in its second field
    labels.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000000,n02 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n01 5 6 7 8\n"
        "ILSVRC2012_val_00000002.JPEG,n02\n"
    )
    spec = {"train": str(tmp_path / "train"), "eval": str(val), "eval_labels": str(labels),
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    prepared = prepare(DataSpec.model_validate(spec))
    evals = rows(prepared.root, prepared.manifest["splits"]["eval"]["shards"])
    assert evals["label"].to_pylist() == [1, 0, 1]
    labels.write_text(labels.read_text() + "ILSVRC2012_val_00000009,n01\n")
    with pytest.raises(DataError, match=r"csv:5: names image 'ILSVRC2012_val_00000009', which"):
        prepare(DataSpec.model_validate(spec))
    labels.write_text("ILSVRC2012_val_00000000,n01\n")
    with pytest.raises(DataError, match=r"val_00000001\.JPEG: has no label in .*2 image\(s\)"):
        prepare(DataSpec.model_validate(spec))
