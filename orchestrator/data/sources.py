"""Finding and fingerprinting data sources: local paths, globs, and s3:// or gs:// URIs."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.errors import DataError
from orchestrator.masking import mask

__all__ = ["DataError", "Source", "filesystem_of", "find_source"]

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """The files one data location stands for, on one filesystem."""

    uri: str  # as the user wrote it
    filesystem: pafs.FileSystem
    files: tuple[str, ...]  # filesystem paths, sorted
    sizes: tuple[int, ...]
    fingerprint: str  # changes when any file's path, size or mtime changes

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def find_source(uri: str) -> Source:
    """Resolve a path, directory, glob or URI to its files; DataError if there are none."""
    fs, path = _filesystem(uri)
    base, pattern = _split_glob(path)
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            if "://" in uri and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DataError(
                    f"{mask(uri)}: the bucket {bucket!r} does not exist (create it, or fix the URI)"
                )
            raise DataError(f"{mask(uri)}: no such file or directory")
        if info.type == pafs.FileType.File and pattern is None:
            infos = [info]
        else:
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                if i.type == pafs.FileType.File
                and not _hidden(i.path, base)
                and (pattern is None or fnmatch.fnmatch(i.path, pattern))
            ]
    except OSError as exc:  # an object store refused or could not answer: say which, masked
        if "://" not in uri:
            raise DataError(f"{mask(uri)}: cannot list it: {exc}") from None
        from orchestrator.storage import storage_error

        raise DataError(storage_error(uri, exc)) from None
    infos.sort(key=lambda i: i.path)
    if not infos:
        raise DataError(f"{mask(uri)}: no files found")
    digest = hashlib.sha256()
    for i in infos:
        mtime = i.mtime_ns if i.mtime_ns is not None else 0
        digest.update(f"{i.path}\0{i.size}\0{mtime}\n".encode())
    return Source(
        uri=uri,
        filesystem=fs,
        files=tuple(i.path for i in infos),
        sizes=tuple(i.size or 0 for i in infos),
        fingerprint=digest.hexdigest(),
    )


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        # ArrowInvalid lives in pyarrow, not pyarrow.fs: naming the latter turned every
        # unreachable bucket into an AttributeError raised by this except clause.
        return filesystem_of(_strip_glob_for_uri(uri)[0], "")[0], _uri_path(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def filesystem_of(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    """`FileSystem.from_uri`, its failures a DataError naming the (masked) URI and `what`."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        where = f"{what}: {uri}" if what else uri
        raise DataError(mask(f"{where}: cannot open this location: {exc}")) from None


def _strip_glob_for_uri(uri: str) -> tuple[str, str | None]:
    scheme, rest = uri.split("://", 1)
    base, pattern = _split_glob(rest)
    return f"{scheme}://{base}", pattern


def _uri_path(uri: str) -> str:
    return uri.split("://", 1)[1].rstrip("/")


def _split_glob(path: str) -> tuple[str, str | None]:
    """Split '/a/b/*.txt' into ('/a/b', '/a/b/*.txt'); no glob gives (path, None)."""
    parts = path.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return "/".join(parts[:i]) or "/", path
    return path.rstrip("/") or "/", None


def _hidden(path: str, base: str) -> bool:
    rel = path[len(base) :].lstrip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))
