"""Real batches to check an export against: a few rows of the run's prepared shards.

At the end of a run, model.json records where the prepared data is (`check_data`); an export,
at once or days later, reads its first rows back with pyarrow alone (no Ray) and turns them
into model inputs by the model's input kind, as the training loop feeds them (unmasked,
unaugmented). Two batches of different sizes, the second of token models also shorter,
prove the dynamic axes of the exported graph.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orchestrator.errors import ExportError
from orchestrator.masking import first_line
from orchestrator.spec import Inputs

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.data import PreparedData

__all__ = ["BATCH_SIZES", "INPUT_KINDS", "InputKind", "check_batches", "check_data"]

BATCH_SIZES = (8, 3)  # two sizes: an export that fixed its batch size fails the second
_SHARDS_RECORDED = 2  # a few batches need the first shard; a second covers a tiny first one


@dataclass(frozen=True)
class InputKind:
    """How one kind of model input (spec `inputs`) is read from shards and what may vary in it."""

    read: Callable[[pa.Table, dict[str, Any], Any], torch.Tensor]  # rows, facts, model section
    dynamic: tuple[str, ...]  # the names of the axes that vary, from axis 0 on


def _tokens(rows: pa.Table, dataset: dict[str, Any], section: Any) -> torch.Tensor:
    return torch.from_numpy(_rows_of(rows, "input_ids").astype(np.int64))


def _images(rows: pa.Table, dataset: dict[str, Any], section: Any) -> torch.Tensor:
    from orchestrator.data.stream import decode_images

    image = dataset.get("image") or {}
    return decode_images(
        rows.column("image").to_pylist(),
        encoding=image.get("encoding", "raw"),
        shape=image.get("shape"),
        size=section.image_size,
        channels=section.in_channels,  # equal to the images' channels: checked before training
        augment=False,
        generator=torch.Generator(),
    )


def _features(rows: pa.Table, dataset: dict[str, Any], section: Any) -> torch.Tensor:
    return torch.from_numpy(_rows_of(rows, "features").astype(np.float32))


def _rows_of(rows: pa.Table, name: str) -> np.ndarray:
    """A fixed-size list column as a (rows, width) array (`flatten` honours a slice's offset,
    which the list's `values` do not)."""
    column = rows.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


# One entry per `Inputs` of the model sections: what each kind of model takes.
INPUT_KINDS: dict[str, InputKind] = {
    "tokens": InputKind(_tokens, ("batch", "sequence")),
    "images": InputKind(_images, ("batch",)),
    "features": InputKind(_features, ("batch",)),
    "labeled_tokens": InputKind(_tokens, ("batch", "sequence")),  # the model masks the padding
}

# An input kind the spec declares but this table lacks would only fail at the end of a run.
if set(INPUT_KINDS) != set(typing.get_args(Inputs)):
    raise ImportError(
        f"orchestrator.exporting.samples.INPUT_KINDS has {sorted(INPUT_KINDS)} but the spec's "
        f"Inputs are {sorted(typing.get_args(Inputs))}: give every input kind an entry"
    )


def check_data(prepared: PreparedData, dataset: dict[str, Any]) -> dict[str, Any]:
    """What model.json records for checking exports later: a few shards (eval, else train) and
    the dataset facts that decode them."""
    split = "eval" if prepared.files("eval") else "train"
    shards = prepared.files(split)[:_SHARDS_RECORDED]
    return {"split": split, "shards": [_uri(prepared, s) for s in shards], "dataset": dataset}


def _uri(prepared: PreparedData, path: str) -> str:
    import pyarrow.fs as pafs

    fs = prepared.filesystem
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path}"


def check_batches(meta: dict[str, Any], section: Any, where: str) -> list[torch.Tensor]:
    """Model inputs from the recorded shards' first rows: one batch per BATCH_SIZES entry, of
    the dtype and fixed axes of the kind's input example (what the model takes)."""
    from orchestrator.models import DataInfo, input_example

    data = meta.get("check_data")
    if not data or not data.get("shards"):
        raise ExportError(
            f"{where}: does not say where the run's data is (check_data), so the export cannot "
            "be checked on real batches; export a model that this orch version trained"
        )
    kind = INPUT_KINDS[section.inputs]
    rows = _first_rows(data["shards"], sum(BATCH_SIZES))
    if rows.num_rows < 2:
        raise ExportError(f"{data['shards'][0]}: too few rows to check an export on")
    example = input_example(section, DataInfo(**meta["data"]))
    inputs = kind.read(rows, data.get("dataset") or {}, section)
    fixed = len(kind.dynamic)  # the axes after the dynamic ones must be the example's
    if inputs.shape[fixed:] != example.shape[fixed:]:
        raise ExportError(
            f"{data['shards'][0]}: its samples have shape {tuple(inputs.shape[1:])}, the model "
            f"takes {tuple(example.shape[1:])}; is this the data the model was trained on?"
        )
    inputs = inputs.to(torch.from_numpy(example).dtype)
    # Never more rows than there are; the second batch stays non-empty.
    first = min(BATCH_SIZES[0], len(inputs) - 1)
    batches = [inputs[:first], inputs[first : first + BATCH_SIZES[1]]]
    if "sequence" in kind.dynamic and batches[1].shape[1] > 2:
        batches[1] = batches[1][:, : batches[1].shape[1] // 2]
    return batches


def _first_rows(shards: list[str], count: int) -> pa.Table:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    tables: list[pa.Table] = []
    for shard in shards:
        try:
            fs, path = (
                pafs.FileSystem.from_uri(shard)
                if "://" in shard
                else (pafs.LocalFileSystem(), shard)
            )
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=count):
                    tables.append(pa.Table.from_batches([batch]))
                    break
        except (OSError, pa.ArrowException) as exc:
            raise ExportError(
                f"{shard}: cannot read the run's prepared data to check the export on "
                f"({first_line(exc)}); export where the run's data cache is reachable"
            ) from None
        if sum(t.num_rows for t in tables) >= count:
            break
    table = pa.concat_tables(tables) if tables else pa.table({})
    return table.slice(0, count)
