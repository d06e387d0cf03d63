"""The data cache and its downloader (rom_fast/io/data.py, ``rom-fast data``).

A local HTTP server on 127.0.0.1 serves the prepared data directory named by
``$ROM_FAST_DATA_SOURCE`` (tests/conftest.py points it at ../shared/data beside the checkout)
under one URL prefix per behaviour: ``good`` (the files as they are), ``corrupt`` (one byte
changed, same length), ``truncated`` (the full Content-Length announced, half the body sent,
connection closed), ``long`` (extra bytes, no Content-Length), ``hang`` (never answers) and
``missing`` (404). Each fault must give a one-line error naming the file and leave nothing in
the cache. No other network is used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import io
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from rom_fast import evaluate
from rom_fast.calibration import calibration_files, calibration_tokens
from rom_fast.cli import main
from rom_fast.io import data

SOURCE = os.environ.get("ROM_FAST_DATA_SOURCE")
ENDLESS = 64 << 20          # what the "endless" server offers: far more than any file


class _Server:
    """The test server: its base URL, the paths it was asked for, and the hang's release."""

    def __init__(self, root: Path):
        self.root, self.requests, self.release, self.sent = root, [], threading.Event(), 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mode, _, rel = self.path.lstrip("/").partition("/")
                server.requests.append((mode, urllib.parse.unquote(rel)))
                path = (server.root / urllib.parse.unquote(rel)).resolve()
                if mode == "missing" or server.root not in path.parents or not path.is_file():
                    self.send_error(404)
                    return
                if mode == "hang":
                    server.release.wait(30)
                    return
                body = path.read_bytes()
                if mode == "corrupt":
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1:]
                self.send_response(200)
                if mode not in ("long", "endless"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncated":
                    body = body[: len(body) // 2]
                if mode == "endless":
                    self._endless(body)
                    return
                self.wfile.write(body + (b"x" * 100 if mode == "long" else b""))
                self.close_connection = True

            def _endless(self, body):
                """The file, then zeros up to ENDLESS bytes, counting what the client accepted."""
                server.sent = 0
                chunk = body + bytes(ENDLESS - len(body))
                with contextlib.suppress(OSError):
                    for start in range(0, ENDLESS, 1 << 16):
                        self.wfile.write(chunk[start:start + (1 << 16)])
                        server.sent += min(1 << 16, ENDLESS - start)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    if not SOURCE or not Path(SOURCE).is_dir():
        pytest.skip("ROM_FAST_DATA_SOURCE (a prepared data directory to serve on 127.0.0.1) is not set")
    missing = data.missing(data.MANIFEST, SOURCE)
    if missing:
        pytest.skip(f"ROM_FAST_DATA_SOURCE={SOURCE} lacks {', '.join(f.path for f in missing)}")
    s = _Server(Path(SOURCE).resolve())
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data cache (ROM_FAST_DATA), and no mirror unless a test sets one."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ROM_FAST_DATA", str(root))
    monkeypatch.delenv("ROM_FAST_DATA_URL", raising=False)
    return root


def _cli(argv) -> tuple:
    """(exit status, stdout, stderr) of the CLI in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _files(root: Path) -> set:
    """Every file under root (hidden temporary files included), relative."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()} if root.exists() else set()


# ----------------------------------------------------------------------------- loopback server


def test_good_files_fill_an_empty_cache(server, cache):
    rc, out, err = _cli(["data", "download", "--from", server.url("good")])
    assert rc == 0, err
    assert _files(cache) == {f.path for f in data.MANIFEST}          # every file, nothing else
    for f in data.MANIFEST:
        body = (cache / f.path).read_bytes()
        assert len(body) == f.size and hashlib.sha256(body).hexdigest() == f.sha256
        assert body == (Path(SOURCE) / f.path).read_bytes()
    assert out.count("fetched ") == len(data.MANIFEST)
    rc, out, _ = _cli(["data", "list", "--verify"])
    assert rc == 0 and f"{len(data.MANIFEST)} of {len(data.MANIFEST)} present" in out
    asked = len(server.requests)
    rc, out, _ = _cli(["data", "download", "--from", server.url("good")])
    assert rc == 0 and out.count("present ") == len(data.MANIFEST) and len(server.requests) == asked


FAULTS = [
    ("corrupt", "sha256"),
    ("truncated", "transfer ended after 628224 of 1256449 bytes (truncated)"),
    ("long", "more than the expected 1256449 bytes"),
    ("hang", "timed out"),
    ("missing", "HTTP 404"),
]


@pytest.mark.parametrize("mode,reason", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_one_line_and_leaves_nothing(server, cache, mode, reason):
    start = time.perf_counter()
    rc, out, err = _cli(["data", "download", "wikitext2", "--from", server.url(mode), "--timeout", "0.5"])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err       # the file's error, then the count
    assert lines[0].startswith("rom-fast: error: data file wikitext2 (wikitext2/tokenized/test.txt) from "
                               f"{server.url(mode)}/wikitext2/tokenized/test.txt: ")
    assert reason in lines[0], lines[0]
    assert lines[1] == "rom-fast: error: 1 of 1 files not fetched; nothing partial was kept (rerun to retry)"
    assert _files(cache) == set()                                   # no temporary file either
    assert time.perf_counter() - start < 10


def test_an_endless_body_is_not_read_past_the_expected_size(server, cache):
    rc, _, err = _cli(["data", "download", "piqa-labels", "--from", server.url("endless"), "--timeout", "5"])
    assert rc == 2 and "more than the expected 3676 bytes" in err and _files(cache) == set()
    # The client closed after size + 1 bytes; what the server got rid of beyond them sits in
    # socket buffers (a few MB at most). Reading on would take all 64 MB.
    assert server.sent < ENDLESS // 4, server.sent


def test_a_failed_forced_download_keeps_the_verified_copy(server, cache):
    assert _cli(["data", "download", "piqa", "--from", server.url("good")])[0] == 0
    rc, _, err = _cli(["data", "download", "piqa", "--force", "--from", server.url("corrupt")])
    assert rc == 2 and err.count("sha256") == 2                       # piqa and piqa-labels
    assert _files(cache) == {"piqa/valid.jsonl", "piqa/valid-labels.lst"}
    assert all(data.status(f, verify=True) == "present" for f in data.select(["piqa"]))


def test_a_corrupt_file_in_the_cache_is_listed_and_replaced(server, cache):
    f = data.entry("piqa-labels")
    path = data.local_path(f)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"1" * f.size)                                   # right size, wrong bytes
    rc, out, _ = _cli(["data", "list"])
    assert rc == 0 and re.search(r"^piqa-labels +present ", out, re.M)          # the size is right
    last = out.splitlines()[-1]
    assert last.startswith("1 of 14 present; fetch the rest: rom-fast data download wikitext2 wiki c4 ")
    assert "piqa-labels" not in last
    rc, out, _ = _cli(["data", "list", "--verify"])
    assert re.search(r"^piqa-labels +wrong sha256 ", out, re.M)
    assert out.splitlines()[-1] == "0 of 14 present; fetch the rest: rom-fast data download"    # all of them
    assert _cli(["data", "download", "piqa-labels", "--from", server.url("good")])[0] == 0
    assert data.status(f, verify=True) == "present"


def test_the_mirror_comes_from_the_environment(server, cache, monkeypatch):
    monkeypatch.setenv("ROM_FAST_DATA_URL", server.url("good"))
    rc, out, _ = _cli(["data", "download", "c4"])
    assert rc == 0 and _files(cache) == {"calibration_text/exllamav2_c4.utf8"}
    assert server.requests[-1] == ("good", "calibration_text/exllamav2_c4.utf8")


def test_nothing_is_downloaded_unasked_and_download_opts_in(server, cache, monkeypatch):
    from rom_fast import cli
    monkeypatch.setenv("ROM_FAST_DATA_URL", server.url("good"))
    asked = len(server.requests)
    args = argparse.Namespace(download=False)
    with pytest.raises(FileNotFoundError) as info:
        cli._require_eval_files(args, ["piqa"])
    assert len(server.requests) == asked and _files(cache) == set()
    assert str(info.value).endswith("fetch: rom-fast data download wikitext2 piqa piqa-labels")
    cli._require_eval_files(argparse.Namespace(download=True), ["piqa"])
    assert _files(cache) == {"wikitext2/tokenized/test.txt", "piqa/valid.jsonl", "piqa/valid-labels.lst"}
    cli._fetch_for(argparse.Namespace(download=True), cli._calibration_files(None) + ["wikitext2"])
    assert "calibration_text/exllamav2_wiki.utf8" in _files(cache)     # compress --download: wiki


# ----------------------------------------------------------------------------- no server needed


def test_data_dir_is_the_env_then_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ROM_FAST_DATA", str(tmp_path / "d"))
    assert data.data_dir() == tmp_path / "d"
    monkeypatch.delenv("ROM_FAST_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_dir() == tmp_path / "xdg" / "rom_fast"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_dir() == tmp_path / "home" / ".cache" / "rom_fast"
    assert evaluate.default_data_dir() == str(tmp_path / "home" / ".cache" / "rom_fast")


def test_manifest_is_consistent():
    names = [f.name for f in data.MANIFEST]
    assert len(set(names)) == len(names) and len({f.path for f in data.MANIFEST}) == len(names)
    for f in data.MANIFEST:
        assert f.url.startswith("https://raw.githubusercontent.com/") and f.size > 0
        assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
    # Every file a loader reads is in the manifest.
    used = {n for files in evaluate.TASK_FILES.values() for n in files} | {evaluate.PERPLEXITY_FILE}
    used |= {n for src in ("wiki", "c4", "shakespeare", "combination") for n in calibration_files(src)}
    assert used == set(names)


def test_select_names_and_groups():
    assert [f.name for f in data.select(["piqa"])] == ["piqa", "piqa-labels"]
    assert [f.name for f in data.select(["perplexity", "wiki"])] == ["wikitext2", "wiki"]
    assert len(data.select(["tasks"])) == 7 and data.select([]) == list(data.MANIFEST)
    with pytest.raises(ValueError, match="unknown data name"):
        data.select(["wikitext3"])


def test_paths_stay_in_the_cache_and_urls_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("ROM_FAST_DATA_URL", raising=False)
    good = data.entry("wiki")
    for bad in ("../evil.txt", "/etc/passwd", "a/../../b", "./x", ""):
        with pytest.raises(ValueError, match="not a plain relative path"):
            data.local_path(data.DataFile("x", bad, good.url, 1, good.sha256, (), ""), tmp_path)
    assert data.source_url(good) == good.url
    assert data.source_url(good, "http://mirror/base/") == "http://mirror/base/calibration_text/exllamav2_wiki.utf8"
    with pytest.raises(ValueError, match="scheme 'ftp'"):
        data.source_url(good, "ftp://mirror")


def test_file_urls_serve_a_local_copy(server, tmp_path):
    f = data.entry("piqa-labels")
    src = tmp_path / "src" / f.path
    src.parent.mkdir(parents=True)
    src.write_bytes((Path(SOURCE) / f.path).read_bytes())
    assert data.fetch(f, tmp_path / "cache", (tmp_path / "src").as_uri()) is True
    assert data.fetch(f, tmp_path / "cache", (tmp_path / "src").as_uri()) is False   # verified copy kept


def test_missing_files_name_the_fetch_command(tmp_path, cache):
    with pytest.raises(FileNotFoundError) as info:
        calibration_tokens("wiki", None)
    message = str(info.value)
    assert "calibration_text/exllamav2_wiki.utf8" in message and str(cache) in message
    assert message.endswith("fetch: rom-fast data download wiki") and "\n" not in message
    with pytest.raises(FileNotFoundError,
                       match="fetch: rom-fast data download boolq-train arc_easy-train arc_challenge-train$"):
        calibration_tokens("combination", None)
    with pytest.raises(FileNotFoundError) as info:
        evaluate.zero_shot(None, None, data_dir=str(tmp_path))
    assert str(info.value).endswith("fetch: rom-fast data download boolq piqa piqa-labels hellaswag winogrande "
                                    f"arc_easy arc_challenge --dir {tmp_path}")
    with pytest.raises(FileNotFoundError, match="fetch: rom-fast data download wikitext2$"):
        evaluate.wikitext2_perplexity(None, None)


def test_data_free_fallback_says_so_in_one_line(cache):
    from rom_fast.calibration import data_free_note, default_calibration
    assert default_calibration() == "generated"
    line = data_free_note(with_perplexity=True)
    assert "\n" not in line and "calibrating on text sampled from the model" in line
    assert line.endswith("for real text and perplexity: rom-fast data download wiki wikitext2")
    assert data_free_note().endswith("for real text: rom-fast data download wiki")


def test_data_usage_errors_are_one_line(cache):
    rc, _, err = _cli(["data", "download", "nope"])
    assert rc == 2 and err.count("\n") == 1 and "unknown data name(s) nope" in err
    rc, _, err = _cli(["data"])
    assert rc == 2 and err.count("\n") == 1


def test_compress_perplexity_without_data_is_one_skip_line(cache, capsys):
    from rom_fast.api import _perplexity
    assert _perplexity(None, object(), 2, progress=True) is None        # never reaches the model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rom_fast: perplexity skipped: data file wikitext2/tokenized/")
    assert err.rstrip().endswith("fetch: rom-fast data download wikitext2")
