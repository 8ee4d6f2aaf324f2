"""Download the evaluation data from the original hosts into the data folder.

Each file is fetched into ``<name>.part`` beside its final name; an interrupted transfer
is resumed with an HTTP Range request (or restarted if the server ignores it), the checksum
is checked, and only a verified file is moved to its final name. A checksum mismatch
deletes the partial file and raises `ChecksumError`.

Every file is checked against a pinned checksum: its sha256 (and size) where known, else
the git blob id of the commit it is fetched from (MQuAKE). Files whose host publishes no
checksum at all (zsRE, MultiCounterFact) are trusted on first use: the sha256 of the first
download is recorded in ``<data folder>/.sha256.json`` and every later download, and every
copy already on disk, must match it.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from memit.evaluation.checksums import (
    RECORD_FILE,
    ChecksumError,
    DownloadError,
    record_checksum,
    record_path,
    recorded_checksums,
    verify_recorded,
)
from memit.evaluation.datasets import DATASETS, RemoteFile
from memit.utils.io import sha256_of
from memit.utils.progress import progress

log = logging.getLogger(__name__)

BASE_URL = "https://memit.baulab.info/data/dsets"
CHUNK = 1 << 20
# The sha256 of each file that has no published checksum, as first downloaded (trust on first use).


# Files that belong to no data set; each data set's own come from its description.
OTHER_FILES: tuple[RemoteFile, ...] = (
    RemoteFile("known_1000.json", "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a", 343_229),
    RemoteFile("attribute_snippets.json", "10b5c1cd105e54d5983c72de1b45bfc88bc7af786f7b99def2557886ff23385b", 926_285_719),
    RemoteFile("idf.npy", "c073d642589d4ac6432f467230329b36364a01e72de63a77a3624b745b923dda", 11_042_168),
    RemoteFile("tfidf_vocab.json", "8a78c4f20d8d85dadfd14e283d71af255482ff18aa0eb8a81716024c05ff888b", 31_639_072),
)
OTHER_BUNDLES: dict[str, tuple[str, ...]] = {
    "known": ("known_1000.json",),
    "generation": ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json"),
}


def remote_files() -> dict[str, RemoteFile]:
    """Every downloadable file by name."""
    specs = [f for spec in DATASETS.values() for f in spec.remote_files]
    return {f.name: f for f in (*specs, *OTHER_FILES)}


def bundles() -> dict[str, tuple[str, ...]]:
    """Names accepted by ``memit download``: each downloadable data set, then the others."""
    own = {spec.name: tuple(f.name for f in spec.remote_files) for spec in DATASETS.values() if spec.remote_files}
    return {**own, **OTHER_BUNDLES}


def git_blob_of(path: str | os.PathLike) -> str:
    """Git's id of the file's content (``git hash-object``): SHA-1 of ``blob <size>\\0`` + bytes."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(path: Path, sha256: str | None = None, size: int | None = None, git_blob: str | None = None) -> str | None:
    """What is wrong with ``path`` against the expected checksums (None: nothing, or none given)."""
    have = path.stat().st_size
    if size is not None and have != size:
        return f"holds {have:,} bytes, not the expected {size:,}"
    if sha256 is not None and (got := sha256_of(path)) != sha256:
        return f"sha256 {got} does not match the expected {sha256}"
    if git_blob is not None and (got := git_blob_of(path)) != git_blob:
        return f"git blob id {got} does not match the expected {git_blob}"
    return None


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _fetch_into(url: str, part: Path, timeout: float, limit: int | None = None) -> None:
    """Append the missing bytes of ``url`` to ``part`` (restart if Range is not honoured);
    stop once ``part`` grows past ``limit`` bytes (the size check then refuses it), so that a
    hostile or broken server cannot fill the disk."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch: the part file is complete
            return
        raise
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            log.info("%s: the server ignored the Range request; starting over", url)
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        with open(part, "ab" if resumed else "wb") as fh, progress(
            total=total, initial=have if resumed else 0, unit="B", unit_scale=True, desc=part.name[:-5], logger=log
        ) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                fh.write(block)
                bar.update(len(block))
                if limit is not None and fh.tell() > limit:
                    log.warning("%s: the server sends more than the expected %d bytes; stopping", url, limit)
                    return
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    *,
    size: int | None = None,
    git_blob: str | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (verified, atomic, resumable). Returns ``dest``.

    ``sha256``, ``size`` and ``git_blob`` are what the file must match (each None: not
    checked). An existing ``dest`` that matches is kept; one that does not is deleted and
    downloaded again. Broken transfers are retried up to ``retries`` times, resuming from the
    partial file; a checksum mismatch after a resumed transfer is retried once from scratch,
    otherwise raises `ChecksumError` naming the file and leaves no file behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        problem = mismatch(dest, sha256, size, git_blob)
        if problem is None:
            log.info("%s is already there", dest)
            return dest
        # Deleted now, so that a failed download leaves no damaged file for a later load to read.
        log.warning("%s %s; deleting it and downloading it again", dest, problem)
        dest.unlink()
    part = part_path(dest)
    attempt = 0
    fresh_retry_done = False
    while True:
        resumed = part.exists() and part.stat().st_size > 0
        try:
            _fetch_into(url, part, timeout, size)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code in (403, 404, 410):
                part.unlink(missing_ok=True)
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: failed after {retries} retries ({err}); rerun to resume from {part}") from None
            log.warning("%s: transfer broken (%s); retry %d/%d", url, err, attempt, retries)
            time.sleep(backoff * attempt)
            continue
        problem = mismatch(part, sha256, size, git_blob)
        if problem is not None:
            part.unlink(missing_ok=True)
            if resumed and not fresh_retry_done:
                log.warning("%s: checksum mismatch after resuming; downloading from scratch", url)
                fresh_retry_done = True
                continue
            raise ChecksumError(f"{dest.name} ({url}): {problem}; nothing was saved")
        os.replace(part, dest)
        log.info("Saved %s", dest)
        return dest


def remote_url(file: RemoteFile, base_url: str | None = None) -> str:
    """Where ``file`` is fetched from: ``base_url`` (a mirror) if given, else its own host,
    else the paper's."""
    return f"{(base_url or file.base_url or BASE_URL).rstrip('/')}/{file.name}"


def fetch_remote(file: RemoteFile, folder: str | os.PathLike, base_url: str | None = None, **kwargs) -> Path:
    """Download ``file`` into ``folder``, checked against its pinned checksums, or else against
    the sha256 recorded on its first download (recorded now if this is the first)."""
    folder = Path(folder)
    url, dest = remote_url(file, base_url), folder / file.name
    pins = dict(size=file.size, git_blob=file.git_blob)
    if file.sha256 is not None:
        return download_file(url, dest, file.sha256, **pins, **kwargs)
    recorded = recorded_checksums(folder).get(file.name)
    try:
        path = download_file(url, dest, recorded, **pins, **kwargs)
    except ChecksumError as err:
        if recorded is None:
            raise
        raise ChecksumError(
            f"{err}: the file changed since its first download (sha256 recorded in {record_path(folder)}); "
            "if its host really replaced it, delete its entry there to accept the new one"
        ) from None
    if recorded is None:
        digest = sha256_of(path)
        record_checksum(folder, file.name, digest)
        # A git blob id pins the file already; a file with no pin at all is worth a warning.
        log.log(
            logging.INFO if file.git_blob else logging.WARNING,
            "%s has no published sha256%s; recorded its sha256 %s in %s, which later downloads must match",
            file.name, " (its git blob id matched)" if file.git_blob else " (trusted on first use)", digest, record_path(folder),
        )
    return path


def download(names: list[str], folder: str | os.PathLike, base_url: str | None = None, **kwargs) -> list[Path]:
    """Download data sets by bundle name (cf, mcf, zsre, mquake, known, generation) or file
    name; ``base_url`` fetches every file from that folder instead of its own host."""
    named, known = bundles(), remote_files()
    files: list[str] = []
    for name in names:
        if name in named:
            files.extend(named[name])
        elif name in known:
            files.append(name)
        else:
            raise DownloadError(f"download: unknown data set {name!r}; choose from {', '.join([*named, *known])}")
    return [fetch_remote(known[f], folder, base_url, **kwargs) for f in dict.fromkeys(files)]


__all__ = [
    "BASE_URL", "RECORD_FILE", "ChecksumError", "DownloadError", "RemoteFile", "bundles", "download", "download_file", "fetch_remote",
    "git_blob_of", "mismatch", "record_checksum", "recorded_checksums", "remote_files", "remote_url", "sha256_of", "verify_recorded",
]
