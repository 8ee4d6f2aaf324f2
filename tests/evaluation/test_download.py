"""The downloader against a local HTTP server on 127.0.0.1 serving the shared data folder."""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from memit.cli import main
from memit.evaluation.download import (
    RECORD_FILE,
    ChecksumError,
    DownloadError,
    download,
    download_file,
    git_blob_of,
    part_path,
    recorded_checksums,
    remote_files,
    remote_url,
    verify_recorded,
)

from ..conftest import DATA_DIR

KNOWN = DATA_DIR / "known_1000.json"
KNOWN_SHA = "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"


class Handler(SimpleHTTPRequestHandler):
    """Serves DATA_DIR with HTTP Range support; the server's flags inject faults."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if server.corrupt:
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        start = 0
        rng = self.headers.get("Range")
        if rng and server.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.break_after is not None:
            # Send part of the body, then drop the connection (once).
            self.wfile.write(body[: server.break_after])
            server.break_after = None
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def _serve(directory: Path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
    httpd.requests, httpd.corrupt, httpd.ranges, httpd.break_after = [], False, True, None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    return httpd


@pytest.fixture()
def server():
    httpd = _serve(DATA_DIR)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def mirror(tmp_path):
    """A server on a folder of the test's own (``mirror.folder``), to serve made-up files."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    httpd = _serve(folder)
    httpd.folder = folder
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_verifies_checksum(server, tmp_path):
    (path,) = download(["known"], tmp_path, base_url=server.url)
    assert path == tmp_path / "known_1000.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == KNOWN_SHA
    assert _files(tmp_path) == ["known_1000.json"]
    # Already there and valid: no new request.
    n = len(server.requests)
    download(["known"], tmp_path, base_url=server.url)
    assert len(server.requests) == n


def test_corrupted_file_is_rejected_and_not_saved(server, tmp_path):
    server.corrupt = True
    with pytest.raises(ChecksumError, match="does not match"):
        download_file(f"{server.url}/known_1000.json", tmp_path / "known_1000.json", KNOWN_SHA, backoff=0)
    assert _files(tmp_path) == []


def test_partial_download_is_resumed_with_range(server, tmp_path):
    dest = tmp_path / "known_1000.json"
    data = KNOWN.read_bytes()
    part_path(dest).write_bytes(data[:100_000])
    download_file(f"{server.url}/known_1000.json", dest, KNOWN_SHA, backoff=0)
    assert server.requests[-1][1] == "bytes=100000-"
    assert dest.read_bytes() == data and _files(tmp_path) == ["known_1000.json"]


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "known_1000.json"
    part_path(dest).write_bytes(b"garbage" * 100)
    download_file(f"{server.url}/known_1000.json", dest, KNOWN_SHA, backoff=0)
    assert dest.read_bytes() == KNOWN.read_bytes() and _files(tmp_path) == ["known_1000.json"]


def test_broken_transfer_is_retried_from_where_it_stopped(server, tmp_path):
    server.break_after = 50_000
    dest = tmp_path / "known_1000.json"
    download_file(f"{server.url}/known_1000.json", dest, KNOWN_SHA, backoff=0)
    assert [r for _, r in server.requests] == [None, "bytes=50000-"]
    assert dest.read_bytes() == KNOWN.read_bytes() and _files(tmp_path) == ["known_1000.json"]


def test_corrupt_partial_file_is_redownloaded_from_scratch(server, tmp_path):
    dest = tmp_path / "known_1000.json"
    part_path(dest).write_bytes(b"x" * 1000)  # wrong bytes: resuming gives a bad checksum
    download_file(f"{server.url}/known_1000.json", dest, KNOWN_SHA, backoff=0)
    assert [r for _, r in server.requests] == ["bytes=1000-", None]
    assert dest.read_bytes() == KNOWN.read_bytes()


def test_missing_file_and_unknown_name(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server.url}/nope.json", tmp_path / "nope.json", None, backoff=0)
    assert _files(tmp_path) == []
    result = CliRunner().invoke(main, ["download", "bogus", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0 and "unknown data set 'bogus'" in result.output


def test_cli_download_uses_data_dir_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMIT_DATA", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["download", "known", "--base-url", server.url])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "known_1000.json").is_file()


def test_a_pinned_file_with_wrong_bytes_is_refused_and_nothing_is_left(server, tmp_path):
    server.corrupt = True
    with pytest.raises(ChecksumError, match=r"known_1000\.json .*sha256 .* does not match"):
        download(["known"], tmp_path / "data", base_url=server.url, backoff=0)
    assert _files(tmp_path / "data") == []


def test_a_damaged_file_on_disk_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "known_1000.json"
    dest.write_bytes(KNOWN.read_bytes()[:-1] + b"!")  # same size, wrong bytes
    download(["known"], tmp_path, base_url=server.url, backoff=0)
    assert dest.read_bytes() == KNOWN.read_bytes()
    assert [r for _, r in server.requests] == [None]


def test_a_damaged_file_on_disk_is_deleted_when_the_new_download_is_bad_too(server, tmp_path):
    dest = tmp_path / "known_1000.json"
    dest.write_bytes(b"[]")
    server.corrupt = True
    with pytest.raises(ChecksumError, match="known_1000.json"):
        download(["known"], tmp_path, base_url=server.url, backoff=0)
    assert _files(tmp_path) == []  # no damaged file left for a later load to read


def test_a_file_larger_than_its_pinned_size_is_cut_off_and_refused(server, tmp_path):
    dest = tmp_path / "known_1000.json"
    with pytest.raises(ChecksumError, match="not the expected 1,000"):
        download_file(f"{server.url}/known_1000.json", dest, KNOWN_SHA, backoff=0, size=1000)
    assert _files(tmp_path) == []


def test_git_blob_id_is_what_git_hash_object_gives(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_of(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_of(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_mquake_is_pinned_to_a_commit_and_its_git_blob_ids(mirror, tmp_path):
    for name in ("MQuAKE-CF-3k.json", "MQuAKE-T.json"):
        file = remote_files()[name]
        assert re.fullmatch(r"https://raw\.githubusercontent\.com/princeton-nlp/MQuAKE/[0-9a-f]{40}/datasets/" + re.escape(name), remote_url(file))
        assert re.fullmatch(r"[0-9a-f]{40}", file.git_blob)
    # A mirror that serves other bytes under MQuAKE's names is refused.
    (mirror.folder / "MQuAKE-CF-3k.json").write_text("[]")
    with pytest.raises(ChecksumError, match=r"MQuAKE-CF-3k\.json .*git blob id .* does not match"):
        download(["MQuAKE-CF-3k.json"], tmp_path / "data", base_url=mirror.url, backoff=0)
    assert _files(tmp_path / "data") == []


def test_a_file_without_a_published_checksum_is_trusted_on_first_use(mirror, tmp_path, caplog):
    data, original = tmp_path / "data", b'[{"subject": "x"}]'
    served = mirror.folder / "zsre_mend_eval.json"
    served.write_bytes(original)
    assert remote_files()["zsre_mend_eval.json"].sha256 is None
    with caplog.at_level(logging.WARNING, logger="memit.evaluation.download"):
        (path,) = download(["zsre"], data, base_url=mirror.url, backoff=0)
    digest = hashlib.sha256(original).hexdigest()
    assert path.read_bytes() == original and recorded_checksums(data) == {"zsre_mend_eval.json": digest}
    assert _files(data) == [RECORD_FILE, "zsre_mend_eval.json"]
    assert "no published sha256" in caplog.text and digest in caplog.text

    # The host replaces the file: a fresh download is refused, naming the file and the record.
    served.write_bytes(b'[{"subject": "y"}]')
    path.unlink()
    with pytest.raises(ChecksumError, match=r"zsre_mend_eval\.json .*changed since its first download .*\.sha256\.json"):
        download(["zsre"], data, base_url=mirror.url, backoff=0)
    assert _files(data) == [RECORD_FILE] and recorded_checksums(data) == {"zsre_mend_eval.json": digest}

    # A local copy that changed is caught by the loaders' check and replaced by the recorded bytes.
    served.write_bytes(original)
    path.write_bytes(b'[{"subject": "z"}]')
    with pytest.raises(ChecksumError, match="zsre_mend_eval.json"):
        verify_recorded(path)
    download(["zsre"], data, base_url=mirror.url, backoff=0)
    assert path.read_bytes() == original
    verify_recorded(path)


def test_a_damaged_checksum_record_is_named(mirror, tmp_path):
    (tmp_path / RECORD_FILE).write_text('["not", "an", "object"]')
    (mirror.folder / "zsre_mend_eval.json").write_text("[]")
    with pytest.raises(ValueError, match=r"checksum record .*\.sha256\.json"):
        download(["zsre"], tmp_path, base_url=mirror.url, backoff=0)
