"""Cutting a corpus into chunks, and the tokenizer's bounded sample: no Ray needed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from orchestrator.data import DataError
from orchestrator.data.chunks import Piece, line_chunks, lines_of, row_group_chunks
from orchestrator.data.formats import FORMATS, TextFormat
from orchestrator.data.sources import find_source
from orchestrator.data.text import line_records, tokenizer_sample
from orchestrator.spec import DataSpec

LOCAL = pafs.LocalFileSystem()


def lines_in_ranges(path: Path, size: int, step: int) -> list[bytes]:
    out = []
    for start in range(0, size, step):
        out += [line for _, line in lines_of(LOCAL, Piece(str(path), start, start + step))]
    return out


@pytest.mark.parametrize("ending", [b"\n", b""])
def test_byte_ranges_read_every_line_once_wherever_they_cut(tmp_path: Path, ending: bytes) -> None:
    # Lines of many lengths (empty ones too), with and without a final newline: every cut,
    # one byte to the whole file, gives back exactly the file's lines, in order.
    lines = [b"x" * (i % 7) + str(i).encode() for i in range(40)] + [b"", b"", b"end"]
    body = b"\n".join(lines) + ending
    path = tmp_path / "corpus.txt"
    path.write_bytes(body)
    for step in [1, 2, 3, 5, 8, 13, 64, len(body)]:
        assert lines_in_ranges(path, len(body), step) == lines, step


def test_offsets_are_where_each_line_starts(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"ab\ncde\n\nf")
    got = list(lines_of(LOCAL, Piece(str(path), 0, 9)))
    assert got == [(0, b"ab"), (3, b"cde"), (7, b""), (8, b"f")]


def test_chunks_group_small_files_and_cut_big_ones(tmp_path: Path) -> None:
    for name, size in (("a.txt", 10), ("b.txt", 10), ("c.txt", 250)):
        (tmp_path / name).write_bytes(b"x\n" * (size // 2))
    chunks = line_chunks(find_source(str(tmp_path)), chunk_bytes=100, first_index=7)
    # a and b together; then c in cuts of 100 bytes, a chunk each
    assert [c.index for c in chunks] == [7, 8, 9, 10]
    assert [len(c.pieces) for c in chunks] == [2, 1, 1, 1]
    assert [c.size for c in chunks] == [20, 100, 100, 50]
    pieces = [p for c in chunks for p in c.pieces]
    assert [(Path(p.path).name, p.start, p.end) for p in pieces][2:] == [
        ("c.txt", 0, 100),
        ("c.txt", 100, 200),
        ("c.txt", 200, 250),
    ]


def test_parquet_chunks_are_row_groups(tmp_path: Path) -> None:
    table = pa.table({"text": [f"document {i}" for i in range(1000)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=100)
    chunks = row_group_chunks(find_source(str(tmp_path / "a.parquet")), chunk_bytes=1)
    assert len(chunks) == 10 and all(len(c.pieces) == 1 for c in chunks)
    fmt = FORMATS["parquet"]
    assert isinstance(fmt, TextFormat)
    texts = [t for c in chunks for p in c.pieces for t in fmt.records(LOCAL, p, "text")]
    assert texts == table.column("text").to_pylist()


def test_a_bad_line_is_named_by_its_line_number_from_any_chunk(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"good line\n" * 50 + b"bad \xff line\n" + b"good line\n" * 50)
    source = find_source(str(path))
    seen = []
    for chunk in line_chunks(source, chunk_bytes=64):
        try:
            list(line_records(LOCAL, chunk.pieces[0], "text"))
        except DataError as exc:
            seen.append(str(exc))
    assert seen == [f"{path}:51: not UTF-8 text"]


def test_the_tokenizer_sample_is_bounded_spread_and_the_same_every_time(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i:05d} of the corpus\n" for i in range(20_000)))
    data = DataSpec(train=str(path), chunk_mb=0.05, tokenizer={"sample_mb": 0.01})
    source = find_source(str(path))
    fmt = FORMATS["text"]
    assert isinstance(fmt, TextFormat)
    chunks = fmt.chunks(source, int(data.chunk_mb * 2**20), 0)
    assert len(chunks) == 10
    sample = list(tokenizer_sample(LOCAL, fmt, chunks, data))
    # At most a budget's worth (plus one line) from each chunk, from every chunk.
    budget = int(0.01 * 2**20) // len(chunks)
    assert sum(len(t) for t in sample) <= int(0.01 * 2**20) + len(chunks) * 30
    assert len(sample) < 20_000 / 10
    numbers = [int(t.split()[1]) for t in sample]
    for chunk in chunks:
        first = chunk.pieces[0].start // 26
        assert any(first <= n < first + budget for n in numbers), chunk.index
    assert sample == list(tokenizer_sample(LOCAL, fmt, chunks, data))
    # With data.limit, the sample is the records used: the first `limit`.
    limited = data.model_copy(update={"limit": 7})
    assert [int(t.split()[1]) for t in tokenizer_sample(LOCAL, fmt, chunks, limited)] == list(
        range(7)
    )
