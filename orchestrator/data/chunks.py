"""A text source cut into chunks: the units that distributed preparation hands to its workers.

A chunk is a run of pieces in source order, about `chunk_mb` of data in all: byte ranges of
line files (plain text, JSON lines) or row groups of Parquet files. The cut depends only on the
files and the setting, never on the cluster, so one node and ten prepare the same chunks and so
the same shards. Packing restarts at each chunk (its last, partial sequence is dropped): a few
hundred tokens in tens of MB.

Byte ranges follow the usual rule for splitting line files: a line belongs to the range in which
it starts. A range that does not start a file skips the line it begins inside of; the range
before it reads that line to its end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.sources import DataError, Source

__all__ = ["Chunk", "Piece", "line_chunks", "line_count_before", "lines_of", "row_group_chunks"]

_READ = 1 << 20  # bytes read from a file at a time


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of a line file, or one row group (`row_group`) of a Parquet file."""

    path: str
    start: int = 0
    end: int = 0
    row_group: int | None = None


@dataclass(frozen=True)
class Chunk:
    index: int  # unique across the train and eval sources: the high bits of its sample ids
    pieces: tuple[Piece, ...]
    size: int  # bytes, as the files store them


def line_chunks(source: Source, chunk_bytes: int, first_index: int = 0) -> list[Chunk]:
    """Cut line files into ranges of at most `chunk_bytes` and group them in source order."""
    pieces: list[tuple[Piece, int]] = []
    for path, size in zip(source.files, source.sizes, strict=True):
        for start in range(0, max(size, 1), chunk_bytes):
            end = min(start + chunk_bytes, size)
            pieces.append((Piece(path, start, end), end - start))
    return _group(pieces, chunk_bytes, first_index)


def row_group_chunks(source: Source, chunk_bytes: int, first_index: int = 0) -> list[Chunk]:
    """Group the row groups of Parquet files, in source order, into about `chunk_bytes` each."""
    pieces: list[tuple[Piece, int]] = []
    for path in source.files:
        try:
            with source.filesystem.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
        for group in range(meta.num_row_groups):
            size = meta.row_group(group).total_byte_size
            pieces.append((Piece(path, row_group=group), size))
    return _group(pieces, chunk_bytes, first_index)


def _group(pieces: list[tuple[Piece, int]], chunk_bytes: int, first_index: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[Piece] = []
    size = 0
    for piece, piece_size in pieces:
        if current and size + piece_size > chunk_bytes:
            chunks.append(Chunk(first_index + len(chunks), tuple(current), size))
            current, size = [], 0
        current.append(piece)
        size += piece_size
    if current:
        chunks.append(Chunk(first_index + len(chunks), tuple(current), size))
    return chunks


def lines_of(fs: pafs.FileSystem, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """The lines that start in the piece's byte range, with the offset each starts at."""
    with fs.open_input_file(piece.path) as f:
        offset = piece.start  # of buf[0] in the file
        if offset > 0:
            # The range before reads the line that began before this one, to its end: skip
            # it, from one byte back, so that a range starting right after a newline keeps
            # its first line.
            f.seek(offset - 1)
            offset -= 1
        buf = f.read(_READ)
        at = 0  # where the next line starts in buf
        if piece.start > 0:
            while (newline := buf.find(b"\n")) < 0:
                if not (block := f.read(_READ)):
                    return
                offset, buf = offset + len(buf), block
            at = newline + 1
        while offset + at < piece.end:
            newline = buf.find(b"\n", at)
            if newline < 0:
                block = f.read(_READ)
                if not block:  # the file's last line, without a newline
                    if at < len(buf):
                        yield offset + at, buf[at:]
                    return
                # keep the unfinished line, drop what was read: one copy per block
                offset, buf, at = offset + at, buf[at:] + block, 0
                continue
            yield offset + at, buf[at:newline]
            at = newline + 1


def line_count_before(fs: pafs.FileSystem, path: str, offset: int) -> int:
    """How many lines end before `offset`: an error names a line by number, not by byte."""
    count = 0
    with fs.open_input_file(path) as f:
        for done in itertools.count(0, _READ):
            if done >= offset:
                break
            block = f.read(min(_READ, offset - done))
            if not block:
                break
            count += block.count(b"\n")
    return count
