"""Object storage (s3://, gs://) as orch's data, cache and run storage: checked before Ray starts,
and the few copies orch makes itself (the final model up, a finished model down).

Credentials and the endpoint come from the environment only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), read by pyarrow's filesystems, which Ray Data and
Ray Train use too; a workload file never holds them. Every message here is masked.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator.errors import RunError
from orchestrator.masking import first_line, mask

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = [
    "check_location",
    "download_dir",
    "is_remote",
    "join",
    "open_location",
    "read_text",
    "storage_error",
    "upload_dir",
]

# What to check when the object store refuses a request: orch has no other source of them.
_CREDENTIALS = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an "
    "S3-compatible server) in the environment"
)


def is_remote(path: str) -> bool:
    """Whether `path` is a URI of an object store rather than a local path."""
    return "://" in path


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI alike."""
    return "/".join([base.rstrip("/"), *parts])


def storage_error(uri: str, exc: BaseException, what: str = "") -> str:
    """A clear, masked message for a request the object store refused or could not answer."""
    text = first_line(exc)
    where = f"{what}: {mask(uri)}" if what else mask(uri)
    # pyarrow says it three ways: S3's error code, a missing bucket on a read, on a write
    missing = ("NO_SUCH_BUCKET", "bucket does not exist", "To create buckets")
    if any(m in text for m in missing):
        return f"{where}: the bucket {_bucket(uri)!r} does not exist (create it, or fix the URI)"
    if any(s in text for s in ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY")):
        return f"{where}: access denied ({mask(text)}); {_CREDENTIALS}"
    return f"{where}: cannot reach it ({mask(text)}); {_CREDENTIALS}"


def open_location(uri: str, what: str = "") -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or URI and the path on it; RunError if it cannot open."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise RunError(storage_error(uri, exc, what)) from None
    return fs, path.rstrip("/")


def check_location(uri: str, what: str) -> None:
    """Refuse, as RunError naming `what` (a spec field) and the bucket, an object-store location
    whose bucket does not exist or that these credentials cannot read. Local paths pass."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return
    bucket = _bucket(uri)
    # The bucket alone: the rest may be a glob (data.train), or not exist yet (storage).
    fs, _ = open_location(f"{uri.split('://', 1)[0]}://{bucket}", what)
    try:
        # One request on the bucket itself (HEAD), whatever the bucket holds.
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise RunError(storage_error(uri, exc, what)) from None
    if info.type == pafs.FileType.NotFound:
        raise RunError(
            f"{what}: {mask(uri)}: the bucket {bucket!r} does not exist, or these credentials "
            f"may not see it; create it, fix the URI, or {_CREDENTIALS}"
        )


def read_text(uri: str) -> str | None:
    """The text of one file at a path or URI; None when there is no such file."""
    fs, path = open_location(uri)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunError(storage_error(uri, exc)) from None


def upload_dir(local: str, uri: str) -> str:
    """Copy the files of a local directory to `uri` (replacing those of the same names); returns
    `uri`. RunError, naming the destination, when the store refuses."""
    import pyarrow.fs as pafs

    fs, path = open_location(uri)
    try:
        pafs.copy_files(
            os.path.abspath(local),
            path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    except OSError as exc:
        raise RunError(storage_error(uri, exc, f"uploading {local}")) from None
    return uri


def download_dir(uri: str, local: str) -> bool:
    """Copy the files under `uri` into a local directory; False when there are none."""
    import pyarrow.fs as pafs

    fs, path = open_location(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return False
        os.makedirs(local, exist_ok=True)
        pafs.copy_files(
            path,
            os.path.abspath(local),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    except OSError as exc:
        raise RunError(storage_error(uri, exc)) from None
    return True


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]
