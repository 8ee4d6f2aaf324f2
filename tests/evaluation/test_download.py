"""The downloader against a local HTTP server on 127.0.0.1 serving the shared data folder."""
from __future__ import annotations

import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from memit.cli import main
from memit.evaluation.download import ChecksumError, DownloadError, download, download_file, part_path

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


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(DATA_DIR)))
    httpd.requests, httpd.corrupt, httpd.ranges, httpd.break_after = [], False, True, None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
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
