"""Checksums recorded on a file's first download, where its host publishes none: later
downloads and loads must find the same bytes."""
from __future__ import annotations

import os
from pathlib import Path

from memit.errors import InputError, MemitError
from memit.utils.io import read_json, sha256_of, write_json

RECORD_FILE = ".sha256.json"


class DownloadError(MemitError, RuntimeError):
    """A file could not be downloaded."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256."""


def record_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / RECORD_FILE


def recorded_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """File name -> sha256 recorded on first download in ``folder`` (empty if none yet)."""
    path = record_path(folder)
    if not path.is_file():
        return {}
    record = read_json(path, what="checksum record")
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
        raise InputError(f"checksum record {path}: expected an object of file name -> sha256; delete it to start again")
    return record


def record_checksum(folder: str | os.PathLike, name: str, sha256: str) -> None:
    """Add ``name``'s sha256 to the folder's record (written atomically)."""
    write_json(record_path(folder), {**recorded_checksums(folder), name: sha256})


def verify_recorded(path: str | os.PathLike) -> None:
    """Raise `ChecksumError` if ``path`` no longer has the sha256 recorded for it on
    first download (a file without a record passes): for loaders of unpinned files."""
    path = Path(path)
    expected = recorded_checksums(path.parent).get(path.name)
    if expected is not None and (got := sha256_of(path)) != expected:
        raise ChecksumError(
            f"{path}: sha256 {got} does not match {expected}, recorded in {record_path(path.parent)} on first download; "
            f"run `memit download` again to replace it"
        )
