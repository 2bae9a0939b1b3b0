"""Named corpora: built-in ones that every Python ships, and downloadable ones kept in a cache.

Built-in corpora (``python-docs``, ``python-code``) need no network. Downloadable corpora
(``tinyshakespeare``, ``enwik8``, ``text8``) are fetched once by ``get`` (``charrnn corpora get
NAME``), verified against a pinned SHA-256, unpacked, and stored in the cache directory; ``load``
then reads them from the cache without touching the network.

A mirror (``mirror=`` or the ``CHARRNN_MIRROR`` variable) replaces the original URL: it is an
``http(s)://`` URL prefix, a ``file://`` URL or a local directory, and must serve each corpus
under its ``Download.filename`` (``tinyshakespeare.txt``, ``enwik8.zip``, ``text8.zip``). The
pinned checksums still apply, so a mirror cannot substitute different data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from charrnn.errors import CharrnnError

log = logging.getLogger(__name__)

Progress = Callable[[int, Optional[int]], None]
"""``progress(done_bytes, total_bytes_or_None)``, called as a download advances."""

# A download is bounded three ways: no read waits longer than TIMEOUT_S, the whole transfer
# must finish within DEADLINE_S plus the time the pinned size takes at MIN_RATE bytes/s (a
# source that trickles a byte every few seconds ends too), and nothing beyond the pinned size
# is read.
TIMEOUT_S = 30.0
DEADLINE_S = 60.0
MIN_RATE = 50_000
_CHUNK = 1 << 20
_TEMP_SUFFIX = ".part"
_STALE_TEMP_S = 600.0  # a temp file untouched this long belongs to a dead download


# --------------------------------------------------------------------------- built-in corpora


@dataclass(frozen=True)
class BuiltinCorpus:
    name: str
    description: str
    size: str
    loader: Callable[[], list[tuple[str, str]]]


def _python_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # the `help()` reference topics of this Python

    return [(f"pydoc_data.topics[{k!r}]", topics[k]) for k in sorted(topics)]


def _python_code() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            files.append((str(path), path.read_bytes().decode("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # a few test fixtures are deliberately not UTF-8
    if not files:
        raise CharrnnError(f"no standard-library .py files found under {root}")
    return files


BUILTIN = {
    c.name: c
    for c in (
        BuiltinCorpus("python-docs", "Python's reference topics (pydoc_data.topics), one topic per document",
                      "about 465k chars", _python_docs),
        BuiltinCorpus("python-code", "this Python's standard-library .py files, one file per document",
                      "about 30M chars", _python_code),
    )
}


# --------------------------------------------------------------------------- downloadable corpora


@dataclass(frozen=True)
class Download:
    """A corpus fetched from the network once and kept in the cache as one text file.

    ``sha256``/``size`` describe the downloaded file (the zip for zipped corpora); ``text_sha256``
    and ``text_size`` the text file cached after unpacking (equal to the former for plain files).
    ``split`` is the benchmark's (train, val, test) sizes in bytes of the text, or None.
    """

    name: str
    description: str
    url: str
    filename: str  # its name on a mirror (and of the download)
    sha256: str
    size: int
    text_sha256: Optional[str]
    text_size: int
    member: Optional[str] = None  # the file to unpack from a zip; None: the download is the text
    split: Optional[tuple[int, int, int]] = None

    @property
    def cache_name(self) -> str:
        return f"{self.name}.txt"


# Hashes: tinyshakespeare computed from a byte-identical copy of karpathy/char-rnn's input.txt
# (1,115,394 bytes); the zip hashes and sizes are the ones huggingface/datasets (enwik8
# dataset_infos.json) and several independent scripts pin, and the unpacked hashes are the ones
# those scripts publish for the member (checked too, after unpacking).
DOWNLOADS = {
    d.name: d
    for d in (
        Download(
            "tinyshakespeare", "the char-rnn Tiny Shakespeare corpus (Karpathy), one document",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            filename="tinyshakespeare.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", size=1_115_394,
            text_sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            text_size=1_115_394),
        Download(
            "enwik8", "the first 10^8 bytes of English Wikipedia (XML, Hutter Prize), one document",
            url="http://mattmahoney.net/dc/enwik8.zip", filename="enwik8.zip",
            sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc", size=36_445_475,
            text_sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
            text_size=100_000_000, member="enwik8",
            split=(90_000_000, 5_000_000, 5_000_000)),
        Download(
            "text8", "enwik8 cleaned to lowercase a-z and spaces (Mahoney), one document",
            url="http://mattmahoney.net/dc/text8.zip", filename="text8.zip",
            sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232", size=31_344_016,
            text_sha256="6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7",
            text_size=100_000_000, member="text8",
            split=(90_000_000, 5_000_000, 5_000_000)),
    )
}


# --------------------------------------------------------------------------- public API


def names() -> list[str]:
    """Names ``charrnn train NAME`` accepts without a path: built-in and downloadable corpora."""
    return sorted([*BUILTIN, *DOWNLOADS])


def cache_dir(override: Optional[str | os.PathLike] = None) -> Path:
    """The download cache: ``override`` (``--cache-dir``), else ``$CHARRNN_CACHE``, else
    ``$XDG_CACHE_HOME/charrnn``, else ``~/.cache/charrnn``. Not created here."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("CHARRNN_CACHE"):
        return Path(os.environ["CHARRNN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "charrnn"


def cached_path(name: str, *, cache_dir: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The cached text file of downloadable corpus ``name``, or None if it is not downloaded."""
    path = _cache_root(cache_dir) / _download(name).cache_name
    return path if path.is_file() else None


def get(name: str, *, cache_dir: Optional[str | os.PathLike] = None, mirror: Optional[str] = None,
        progress: Optional[Progress] = None) -> Path:
    """Download corpus ``name`` into the cache once and return its text file.

    A cached file that still matches its checksum is returned without any network access.
    Otherwise the file is fetched from ``mirror`` (or ``$CHARRNN_MIRROR``, or the corpus' own
    URL) into a temporary file in the cache directory, its SHA-256 checked, a zip member
    unpacked (streamed, and checked too), and only then moved into place with ``os.replace``:
    a failed, refused or interrupted download leaves nothing behind.

    Args:
        name: a downloadable corpus (see ``DOWNLOADS``).
        cache_dir: overrides the cache directory (see ``cache_dir()``).
        mirror: an ``http(s)://`` URL prefix, ``file://`` URL or local directory serving the
            corpus under ``Download.filename``.
        progress: called as ``progress(done_bytes, total_bytes_or_None)`` while downloading.

    Raises:
        CharrnnError: unknown corpus, network failure, checksum mismatch, unwritable cache.
    """
    d = _download(name)
    root = _cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharrnnError(f"cannot create cache directory {root}: {e.strerror or e}") from None
    _remove_stale_temps(root, d.name)
    final = root / d.cache_name
    if final.is_file():
        if _verified(final, d.text_sha256, d.text_size):
            log.info("%s is already cached at %s", d.name, final)
            return final
        log.warning("cached %s at %s does not match its checksum; downloading it again", d.name, final)

    source = _source(d, mirror if mirror is not None else os.environ.get("CHARRNN_MIRROR"))
    # Everything the transfer imports is imported before a temporary exists: the CLI ends an
    # interrupt that lands inside an import at once, with no ``finally`` to remove the file.
    import encodings.cp437  # noqa: F401  (zip member names)
    import encodings.idna  # noqa: F401  (host names, on the first connection)
    import http.client  # noqa: F401
    import urllib.request  # noqa: F401
    import zipfile  # noqa: F401

    temps: list[Path] = []
    try:
        download = _temp(root, d.name, temps)
        digest = _fetch(d.name, source, download, progress, d.size)
        _check(d.name, source, d.sha256, digest)
        text = download
        if d.member is not None:
            text = _temp(root, d.name, temps)
            _check(d.name, f"{source} (member {d.member})", d.text_sha256, _unzip(d, download, text))
        os.replace(text, final)
    except OSError as e:
        raise CharrnnError(f"cannot write {d.name} into cache directory {root}: {e.strerror or e}") from None
    finally:
        for t in {*temps, *root.glob(f".{d.name}.{os.getpid()}.*{_TEMP_SUFFIX}")}:
            t.unlink(missing_ok=True)
    log.info("cached %s at %s", d.name, final)
    return final


def load(name: str, *, cache_dir: Optional[str | os.PathLike] = None) -> list[tuple[str, str]]:
    """The ``(source, text)`` files of a named corpus; downloadable ones come from the cache only.

    Raises:
        CharrnnError: unknown corpus, or a downloadable one not yet fetched with ``get``.
    """
    if name in BUILTIN:
        return BUILTIN[name].loader()
    d = _download(name)
    path = _require_cached(d, cache_dir)
    return [(str(path), _decode(_read(path), str(path)))]


def standard_split(name: str) -> Optional[tuple[int, int, int]]:
    """The corpus' standard (train, val, test) sizes in bytes of its text, or None if it has none.

    enwik8 and text8: 90M/5M/5M, the benchmark split (use ``load_split`` to get the texts).
    Corpora without one (built-ins, tinyshakespeare) leave the choice to the caller.
    """
    if name in BUILTIN:
        return None
    return _download(name).split


def load_split(name: str, *, cache_dir: Optional[str | os.PathLike] = None) -> dict[str, str]:
    """The texts ``{"train", "val", "test"}`` of a cached corpus' standard split.

    The split is defined in bytes; each cut is moved forward to the next UTF-8 character
    boundary (at most 3 bytes) so no character is split between two parts.

    Raises:
        CharrnnError: the corpus has no standard split, or is not downloaded.
    """
    d = _download(name)
    if d.split is None:
        raise CharrnnError(f"corpus {name!r} has no standard train/val/test split")
    path = _require_cached(d, cache_dir)
    raw = _read(path)
    train, val, _ = d.split
    # A byte cut may land inside a multi-byte character (possible in enwik8, never in text8):
    # moving it forward keeps every part strictly decodable and the parts' concatenation exact.
    a = _char_boundary(raw, train)
    b = _char_boundary(raw, max(a, train + val))
    return {part: _decode(raw[lo:hi], f"{path} [{part}]")
            for part, lo, hi in (("train", 0, a), ("val", a, b), ("test", b, len(raw)))}


def describe(*, cache_dir: Optional[str | os.PathLike] = None) -> list[dict]:
    """One row per named corpus, for ``charrnn corpora``.

    Keys: ``name``, ``kind`` (``built-in`` or ``download``), ``description``, ``size``,
    ``split`` (e.g. ``"90M/5M/5M bytes"``, or None) and ``cached`` (the cached file's path as a
    string, or None; always None for built-ins, which need no cache).
    """
    rows = [{"name": c.name, "kind": "built-in", "description": c.description, "size": c.size,
             "split": None, "cached": None} for c in BUILTIN.values()]
    root = _cache_root(cache_dir)
    for d in DOWNLOADS.values():
        size = f"{d.text_size:,} bytes"
        if d.member is not None:
            size += f" ({d.size:,}-byte download)"
        path = root / d.cache_name
        rows.append({"name": d.name, "kind": "download", "description": d.description, "size": size,
                     "split": "/".join(_mega(n) for n in d.split) + " bytes" if d.split else None,
                     "cached": str(path) if path.is_file() else None})
    return rows


# --------------------------------------------------------------------------- helpers


def _download(name: str) -> Download:
    if name in DOWNLOADS:
        return DOWNLOADS[name]
    if name in BUILTIN:
        raise CharrnnError(f"corpus {name!r} is built in: there is nothing to download")
    raise CharrnnError(f"unknown corpus {name!r} (known: {', '.join(names())})")


def _cache_root(override: Optional[str | os.PathLike]) -> Path:
    return cache_dir(override)


def _require_cached(d: Download, override: Optional[str | os.PathLike]) -> Path:
    root = _cache_root(override)
    path = root / d.cache_name
    if not path.is_file():
        raise CharrnnError(f"corpus {d.name!r} is not downloaded (looked in {root}): "
                           f"run `charrnn corpora get {d.name}` first")
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None


def _decode(raw: bytes, source: str) -> str:
    # Strict UTF-8: the pinned files are valid UTF-8 (text8 is plain ASCII, tinyshakespeare ASCII,
    # enwik8 UTF-8 XML), so this never fails on a verified download; failing loudly beats silently
    # changing characters. enwik8's byte-based split cuts are aligned in `load_split` instead.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CharrnnError(f"{source} is not valid UTF-8 (byte offset {e.start}); "
                           f"delete it and run `charrnn corpora get` again") from None


def _char_boundary(raw: bytes, i: int) -> int:
    """The first index >= i that does not fall inside a UTF-8 multi-byte character."""
    i = min(i, len(raw))
    while i < len(raw) and raw[i] & 0xC0 == 0x80:  # a continuation byte
        i += 1
    return i


def _mega(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n:,}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, sha256: Optional[str], size: int) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        return sha256 is None or _sha256_file(path) == sha256
    except OSError:
        return False


def _check(name: str, source: str, expected: Optional[str], actual: str) -> None:
    if expected is not None and actual != expected:
        raise CharrnnError(f"checksum mismatch for {name} from {source}: expected sha256 {expected}, "
                           f"got {actual}; nothing was cached")


def _temp(root: Path, name: str, temps: list[Path]) -> Path:
    import tempfile

    # The pid in the name lets ``get`` remove this process's temporaries even when an interrupt
    # lands between their creation and ``temps`` hearing of them.
    fd, path = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=_TEMP_SUFFIX, dir=root)
    os.close(fd)
    temps.append(Path(path))
    return Path(path)


def _remove_stale_temps(root: Path, name: str) -> None:
    """Delete temp files a killed download of ``name`` left behind (a live one keeps writing)."""
    now = time.time()
    for p in root.glob(f".{name}.*{_TEMP_SUFFIX}"):
        try:
            if now - p.stat().st_mtime > _STALE_TEMP_S:
                p.unlink()
                log.info("removed stale temporary file %s", p)
        except OSError:
            pass


def _source(d: Download, mirror: Optional[str]) -> str:
    """Where to fetch ``d`` from: a URL or a local path."""
    if not mirror:
        return d.url
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + d.filename
    if mirror.startswith("file:"):
        import urllib.parse
        import urllib.request

        mirror = urllib.request.url2pathname(urllib.parse.urlparse(mirror).path)
    return str(Path(mirror).expanduser() / d.filename)


def _fetch(name: str, source: str, dest: Path, progress: Optional[Progress], size: int) -> str:
    """Copy ``source`` (URL or path) into ``dest``, returning the SHA-256 of what was written.

    Reads at most ``size`` bytes (the pinned size) and refuses a source that holds more, one
    whose reads stall past ``TIMEOUT_S``, or a transfer that outlasts its deadline.
    """
    import http.client
    import urllib.error
    import urllib.request

    log.info("downloading %s from %s", name, source)
    deadline = time.monotonic() + DEADLINE_S + size / MIN_RATE
    is_url = source.startswith(("http://", "https://"))

    def fail(why: str) -> CharrnnError:
        return CharrnnError(f"cannot download {name} from {source}: {why}; nothing was cached")

    try:
        if is_url:
            request = urllib.request.Request(source, headers={"User-Agent": "charrnn"})
            stream: BinaryIO = urllib.request.urlopen(request, timeout=TIMEOUT_S)
            length = stream.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            stream = open(source, "rb")
            total = os.fstat(stream.fileno()).st_size
    except urllib.error.HTTPError as e:
        raise CharrnnError(f"cannot download {name} from {source}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = _reason(e.reason) if isinstance(e.reason, BaseException) else e.reason
        raise CharrnnError(f"cannot download {name} from {source}: {reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise CharrnnError(f"cannot download {name} from {source}: {_reason(e)}") from None

    h = hashlib.sha256()
    done = 0
    with stream, open(dest, "wb") as out:
        if total is not None and total > size:
            raise fail(f"it is {total:,} bytes, not the pinned {size:,}")
        if progress:
            progress(0, total)
        while True:
            if time.monotonic() > deadline:
                raise fail(f"too slow: {done:,} of {size:,} bytes after "
                           f"{DEADLINE_S + size / MIN_RATE:.0f} s")
            try:
                # read1: whatever has arrived (up to the size plus one byte, to see an excess),
                # so a trickling source cannot hold one read past the deadline.
                chunk = stream.read1(min(_CHUNK, size + 1 - done))
            except (OSError, http.client.HTTPException) as e:
                raise fail(f"{_reason(e)} after {done:,} bytes") from None
            if not chunk:
                break
            done += len(chunk)
            if done > size:
                raise fail(f"it sent more than the pinned {size:,} bytes")
            out.write(chunk)
            h.update(chunk)
            if progress:
                progress(done, total)
    # http.client returns b"" when the connection closes early, so check the length ourselves.
    if total is not None and done != total:
        raise CharrnnError(f"cannot download {name} from {source}: the transfer was cut short "
                           f"({done:,} of {total:,} bytes); nothing was cached")
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _unzip(d: Download, archive: Path, dest: Path) -> str:
    """Stream zip member ``d.member`` of ``archive`` into ``dest``, returning its SHA-256."""
    import zipfile

    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(d.member) as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
    except KeyError:
        raise CharrnnError(f"the {d.name} download {d.filename} holds no file {d.member!r}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
        raise CharrnnError(f"cannot unpack {d.filename} for {d.name}: {e}") from None
    return h.hexdigest()
