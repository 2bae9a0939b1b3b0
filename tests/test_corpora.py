"""Named corpora: built-ins, and the download path against a server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import socket
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from charrnn import corpora
from charrnn.corpora import Download
from charrnn.errors import CharrnnError

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """Serves files from ``root``; counts requests; cuts short the files named in ``truncate``."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.truncate: set[str] = set()
        self.custom: dict = {}  # name -> handler(request_handler): serves that file its own way
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                name = self.path.lstrip("/")
                if name in server.custom:
                    server.custom[name](self)
                    return
                if name in server.truncate:
                    body = (server.root / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("CHARRNN_MIRROR", "CHARRNN_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = Server(root)
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def register(monkeypatch, data: bytes, *, name="tiny", filename="tiny.txt", sha256=None,
             member=None, text: bytes | None = None, split=None, url="http://127.0.0.1:9/nowhere"):
    """Add a test corpus to the registry; ``data`` is the served file, ``text`` the unpacked one."""
    text = data if text is None else text
    d = Download(name, "a test corpus", url=url, filename=filename,
                 sha256=sha256 or sha(data), size=len(data), text_sha256=sha(text),
                 text_size=len(text), member=member, split=split)
    monkeypatch.setitem(corpora.DOWNLOADS, name, d)
    return d


def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def assert_refused_leaving_nothing(served, cache, match: str) -> None:
    """Downloading ``tiny`` from ``served`` is refused with a message matching ``match``, and
    the cache is left as empty as it was (no partial or temporary file)."""
    with pytest.raises(CharrnnError, match=match):
        corpora.get("tiny", cache_dir=cache, mirror=served.url)
    assert listing(cache) == []


# --------------------------------------------------------------------------- download path


def test_get_downloads_verifies_and_load_then_works_offline(served, cache, monkeypatch):
    data = "First Citizen:\nBefore we proceed — hear me speak.\n".encode()
    (served.root / "tiny.txt").write_bytes(data)
    register(monkeypatch, data)
    seen = []

    path = corpora.get("tiny", cache_dir=cache, mirror=served.url, progress=lambda d, t: seen.append((d, t)))

    assert path == cache / "tiny.txt" and path.read_bytes() == data
    assert listing(cache) == ["tiny.txt"]
    assert served.requests == ["/tiny.txt"]
    assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))

    assert corpora.get("tiny", cache_dir=cache, mirror=served.url) == path  # cached: no request
    assert served.requests == ["/tiny.txt"]

    no_network(monkeypatch)
    served.close()
    assert corpora.load("tiny", cache_dir=cache) == [(str(path), data.decode())]
    assert corpora.cached_path("tiny", cache_dir=cache) == path


def test_checksum_mismatch_is_refused_and_caches_nothing(served, cache, monkeypatch):
    (served.root / "tiny.txt").write_bytes(b"tampered text\n")
    expected = sha(b"the real text\n")
    register(monkeypatch, b"the real text\n")

    with pytest.raises(CharrnnError) as e:
        corpora.get("tiny", cache_dir=cache, mirror=served.url)
    assert expected in str(e.value) and sha(b"tampered text\n") in str(e.value)
    assert "checksum" in str(e.value)
    assert listing(cache) == []


def test_interrupted_download_leaves_no_partial_file(served, cache, monkeypatch):
    data = b"x" * 5000
    (served.root / "tiny.txt").write_bytes(data)
    served.truncate.add("tiny.txt")
    register(monkeypatch, data)

    assert_refused_leaving_nothing(served, cache, "cut short")
    with pytest.raises(CharrnnError, match="charrnn corpora get tiny"):
        corpora.load("tiny", cache_dir=cache)


def test_interrupt_during_download_cleans_up(served, cache, monkeypatch):
    data = b"y" * 3000
    (served.root / "tiny.txt").write_bytes(data)
    register(monkeypatch, data)

    def ctrl_c(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        corpora.get("tiny", cache_dir=cache, mirror=served.url, progress=ctrl_c)
    assert listing(cache) == []


def _send(handler, body: bytes, length=None, pause: float = 0.0, piece: int = 0) -> None:
    """Serve ``body`` with ``length`` as Content-Length (None: no header, the end is the close),
    in pieces of ``piece`` bytes ``pause`` seconds apart (0: all at once)."""
    handler.send_response(200)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    handler.close_connection = True
    try:
        for i in range(0, len(body), piece or len(body) or 1):
            handler.wfile.write(body[i:i + (piece or len(body))])
            handler.wfile.flush()
            time.sleep(pause)
    except OSError:  # the client gave up: that is the point
        pass


@pytest.mark.parametrize("announced", [True, False])
def test_a_source_sending_more_than_the_pinned_size_is_refused(served, cache, monkeypatch, announced):
    data = b"z" * 4000
    register(monkeypatch, data)
    body = data + b"more and more" * 1000
    served.custom["tiny.txt"] = lambda h: _send(h, body, len(body) if announced else None)
    assert_refused_leaving_nothing(served, cache, "pinned 4,000")


def test_a_source_that_stops_sending_times_out(served, cache, monkeypatch):
    data = b"s" * 4000
    register(monkeypatch, data)
    monkeypatch.setattr(corpora, "TIMEOUT_S", 0.5)
    served.custom["tiny.txt"] = lambda h: _send(h, data, len(data), pause=3.0, piece=100)
    assert_refused_leaving_nothing(served, cache, "timed out after 100 bytes")  # the first silence ends it


def test_a_trickling_source_hits_the_overall_deadline(served, cache, monkeypatch):
    data = b"t" * 4000
    register(monkeypatch, data)
    # Every read returns within the per-read timeout; only the overall deadline can end this.
    monkeypatch.setattr(corpora, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(corpora, "DEADLINE_S", 0.5)
    monkeypatch.setattr(corpora, "MIN_RATE", 10**9)
    served.custom["tiny.txt"] = lambda h: _send(h, data, len(data), pause=0.1, piece=10)
    assert_refused_leaving_nothing(served, cache, "too slow")


def test_zip_member_is_unpacked(served, cache, monkeypatch):
    text = b"anarchism originated as a term of abuse " * 100
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README", b"not this one")
        zf.writestr("tiny8", text)
    (served.root / "tiny8.zip").write_bytes(buf.getvalue())
    register(monkeypatch, buf.getvalue(), filename="tiny8.zip", member="tiny8", text=text)

    path = corpora.get("tiny", cache_dir=cache, mirror=served.url)

    assert path.read_bytes() == text
    assert listing(cache) == ["tiny.txt"]  # the zip itself is not kept
    assert corpora.load("tiny", cache_dir=cache)[0][1] == text.decode()


def test_zip_member_checksum_and_missing_member(served, cache, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny8", b"some other text")
    (served.root / "tiny8.zip").write_bytes(buf.getvalue())

    register(monkeypatch, buf.getvalue(), filename="tiny8.zip", member="tiny8", text=b"expected text")
    assert_refused_leaving_nothing(served, cache, sha(b"expected text"))

    register(monkeypatch, buf.getvalue(), filename="tiny8.zip", member="absent", text=b"x")
    assert_refused_leaving_nothing(served, cache, "absent")


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_local_directory_mirror(tmp_path, cache, monkeypatch, form):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = b"ROMEO:\nBut soft!\n"
    (mirror / "tiny.txt").write_bytes(data)
    register(monkeypatch, data)
    no_network(monkeypatch)

    path = corpora.get("tiny", cache_dir=cache, mirror=str(mirror) if form == "path" else mirror.as_uri())
    assert path.read_bytes() == data


def test_mirror_from_environment_and_registry_url(served, cache, monkeypatch):
    data = b"JULIET:\nO Romeo.\n"
    (served.root / "tiny.txt").write_bytes(data)
    register(monkeypatch, data)
    monkeypatch.setenv("CHARRNN_MIRROR", served.url.rstrip("/"))
    assert corpora.get("tiny", cache_dir=cache).read_bytes() == data
    assert served.requests == ["/tiny.txt"]

    monkeypatch.delenv("CHARRNN_MIRROR")
    register(monkeypatch, data, name="direct", url=served.url + "tiny.txt")
    assert corpora.get("direct", cache_dir=cache).read_bytes() == data
    assert served.requests == ["/tiny.txt", "/tiny.txt"]


def test_network_errors_become_charrnn_errors(served, cache, monkeypatch):
    register(monkeypatch, b"abc")
    with pytest.raises(CharrnnError, match=r"cannot download tiny from http://127\.0\.0\.1:\d+/tiny\.txt: HTTP 404"):
        corpora.get("tiny", cache_dir=cache, mirror=served.url)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CharrnnError, match="cannot download tiny"):
        corpora.get("tiny", cache_dir=cache, mirror=f"http://127.0.0.1:{port}/")

    with pytest.raises(CharrnnError, match="cannot download tiny"):
        corpora.get("tiny", cache_dir=cache, mirror=str(cache / "no-such-dir"))
    assert listing(cache) == []


def test_stale_temp_files_are_removed_and_corrupt_cache_refetched(served, cache, monkeypatch):
    data = b"HAMLET:\nTo be.\n"
    (served.root / "tiny.txt").write_bytes(data)
    register(monkeypatch, data)
    cache.mkdir()
    stale, live = cache / ".tiny.dead1234.part", cache / ".tiny.live5678.part"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    (cache / "tiny.txt").write_bytes(b"corrupted")

    corpora.get("tiny", cache_dir=cache, mirror=served.url)

    assert not stale.exists() and live.exists()  # a recent one may be another live download
    assert (cache / "tiny.txt").read_bytes() == data
    assert served.requests == ["/tiny.txt"]


def test_load_split_cuts_on_character_boundaries(tmp_path, cache, monkeypatch):
    text = "ab€cd".encode() + b"efgh"  # '€' is 3 bytes, at byte offsets 2..4
    register(monkeypatch, text, split=(3, 3, len(text) - 6))
    mirror = tmp_path / "m"
    mirror.mkdir()
    (mirror / "tiny.txt").write_bytes(text)
    corpora.get("tiny", cache_dir=cache, mirror=str(mirror))

    parts = corpora.load_split("tiny", cache_dir=cache)
    # each cut is at its nominal byte offset (3 and 6), moved forward to a character boundary
    assert parts == {"train": "ab€", "val": "c", "test": "defgh"}
    assert "".join(parts.values()) == text.decode()
    assert corpora.standard_split("tiny") == (3, 3, 5)
    with pytest.raises(CharrnnError, match="no standard"):
        corpora.load_split("tinyshakespeare", cache_dir=cache)


def test_load_of_uncached_download_says_how_to_get_it(cache):
    with pytest.raises(CharrnnError, match="run `charrnn corpora get enwik8` first"):
        corpora.load("enwik8", cache_dir=cache)


def test_unknown_and_builtin_names(cache):
    with pytest.raises(CharrnnError, match="unknown corpus"):
        corpora.load("no-such-corpus")
    with pytest.raises(CharrnnError, match="unknown corpus"):
        corpora.get("no-such-corpus", cache_dir=cache)
    with pytest.raises(CharrnnError, match="built in"):
        corpora.get("python-docs", cache_dir=cache)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert corpora.cache_dir() == tmp_path / "home" / ".cache" / "charrnn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.cache_dir() == tmp_path / "xdg" / "charrnn"
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "env"))
    assert corpora.cache_dir() == tmp_path / "env"
    assert corpora.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert corpora.cache_dir("~/x") == tmp_path / "home" / "x"


# --------------------------------------------------------------------------- registry and listing


def test_registry_and_names():
    assert {"python-docs", "python-code", "tinyshakespeare", "enwik8", "text8"} <= set(corpora.names())
    assert corpora.names() == sorted(corpora.names())
    assert corpora.DOWNLOADS["tinyshakespeare"].text_size == 1_115_394
    for name in ("enwik8", "text8"):
        d = corpora.DOWNLOADS[name]
        assert d.filename == f"{name}.zip" and d.member == name and d.text_size == 10**8
        assert corpora.standard_split(name) == (90_000_000, 5_000_000, 5_000_000)
    assert corpora.standard_split("tinyshakespeare") is None
    assert corpora.standard_split("python-docs") is None
    for d in corpora.DOWNLOADS.values():
        assert len(d.sha256) == 64 and d.url.rsplit("/", 1)[1] in (d.filename, "input.txt")


def test_describe_lists_both_kinds_and_cache_state(tmp_path, cache, monkeypatch):
    rows = {r["name"]: r for r in corpora.describe(cache_dir=cache)}
    assert set(rows) == set(corpora.names())
    assert rows["python-docs"]["kind"] == "built-in" and rows["enwik8"]["kind"] == "download"
    assert rows["enwik8"]["split"] == "90M/5M/5M bytes" and rows["enwik8"]["cached"] is None
    assert all({"name", "kind", "description", "size", "split", "cached"} <= set(r) for r in rows.values())

    mirror = tmp_path / "m"
    mirror.mkdir()
    (mirror / "tiny.txt").write_bytes(b"abc")
    register(monkeypatch, b"abc")
    path = corpora.get("tiny", cache_dir=cache, mirror=str(mirror))
    rows = {r["name"]: r for r in corpora.describe(cache_dir=cache)}
    assert rows["tiny"]["cached"] == str(path)


def test_tinyshakespeare_through_a_local_mirror(cache, monkeypatch, shakespeare_path):
    no_network(monkeypatch)
    assert sha(shakespeare_path.read_bytes()) == corpora.DOWNLOADS["tinyshakespeare"].sha256
    corpora.get("tinyshakespeare", cache_dir=cache, mirror=str(shakespeare_path.parent))
    [(_, text)] = corpora.load("tinyshakespeare", cache_dir=cache)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")


# --------------------------------------------------------------------------- built-ins


def test_python_docs_is_one_document_per_topic():
    from pydoc_data.topics import topics

    files = corpora.load("python-docs")
    assert len(files) == len(topics)
    total = sum(len(t) for _, t in files)
    assert total == sum(len(v) for v in topics.values())
    assert 300_000 < total < 700_000  # "about 465k chars"


def test_python_code_is_stdlib_py_files():
    files = corpora.load("python-code")
    assert len(files) > 500
    assert all(src.endswith(".py") for src, _ in files)
    assert all("site-packages" not in src for src, _ in files)


NO_IMPORT_WITH_A_TEMPORARY = r"""
import hashlib, sys, zipfile, io
from pathlib import Path
from charrnn import corpora

cache, mirror, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
data = b"some text\n" * 100
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("tiny8", data)
(mirror / "tiny8.zip").write_bytes(buf.getvalue())
sha = lambda b: hashlib.sha256(b).hexdigest()
corpora.DOWNLOADS["tiny"] = corpora.Download(
    "tiny", "a test corpus", url="http://127.0.0.1:9/nowhere", filename="tiny8.zip",
    sha256=sha(buf.getvalue()), size=len(buf.getvalue()), text_sha256=sha(data), text_size=len(data),
    member="tiny8")
for m in [m for m in sys.modules if m.split(".")[0] in ("zipfile", "urllib", "http", "email", "ssl")]:
    del sys.modules[m]  # whatever get needs, it imports afresh

class Watch:
    def find_spec(self, name, path=None, target=None):
        if any(cache.glob("*.part")):
            print("imported with a temporary:", name)
        return None

sys.meta_path.insert(0, Watch())
corpora.get("tiny", cache_dir=cache, mirror=spec)
print("done")
"""


@pytest.mark.parametrize("over", ["http", "path"])
def test_get_imports_nothing_while_a_temporary_exists(served, tmp_path, over):
    """An interrupt that lands inside an import ends the command at once (an exception raised
    there would surface as an ImportError), so no ``finally`` runs: ``get`` must have imported
    what it needs before it creates a temporary file, or a Ctrl-C can leave one behind."""
    import subprocess
    import sys

    (tmp_path / "cache").mkdir()
    mirror = served.root if over == "http" else tmp_path
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", NO_IMPORT_WITH_A_TEMPORARY, str(tmp_path / "cache"), str(mirror),
                        served.url if over == "http" else str(mirror)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["done"]


@pytest.mark.slow
def test_ctrl_c_during_charrnn_corpora_get_leaves_no_partial_file(served, cache):
    import signal
    import subprocess
    import sys

    # The real corpus name, served slowly: the command is still downloading when Ctrl-C comes.
    body = b"First Citizen:\n" * 80_000  # ~1.2 MB, the size the registry pins
    served.custom["tinyshakespeare.txt"] = lambda h: _send(h, body[:1_115_394], 1_115_394, pause=0.05,
                                                           piece=4096)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "corpora", "--cache-dir", str(cache), "get",
                          "tinyshakespeare", "--mirror", served.url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(cache.glob(".tinyshakespeare.*")) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert any(cache.glob(".tinyshakespeare.*")), "the download did not start"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert listing(cache) == []
