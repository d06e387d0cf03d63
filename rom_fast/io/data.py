"""Evaluation and calibration data on demand: the cache directory, the manifest, the downloader.

Every file rom_fast reads for perplexity, calibration or the zero-shot tasks is a public file,
listed in :data:`MANIFEST` with its place in the cache, its original URL (a fixed commit of a
public GitHub repository, so the bytes never change), its size and its sha256. The files are
used exactly as published (the HellaSwag file stays bzip2-compressed: the task reader opens it
so), so no conversion stands between the download and the checksum.

The cache directory is ``$ROM_FAST_DATA`` if set, else ``$XDG_CACHE_HOME/rom_fast``, else
``~/.cache/rom_fast``. Offline machines and CI point ``ROM_FAST_DATA`` at a prepared copy.

Nothing is fetched unless asked (``rom-fast data download``, or ``--download`` on a command).
A download is untrusted input: the path stays inside the cache directory, the body is streamed
to a temporary file beside its target and never read past the expected size, and the file is
renamed into place only when its size and sha256 match; on any failure the temporary file is
removed and a file already in place is left untouched. ``$ROM_FAST_DATA_URL`` (or
``base_url=``) fetches every file from ``BASE/<path in the cache>`` instead: a mirror, or a
copy of a prepared directory served over HTTP.

Standard library only: this module imports nothing of rom_fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import shlex
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, List, Optional

DATA_ENV = "ROM_FAST_DATA"
URL_ENV = "ROM_FAST_DATA_URL"
DEFAULT_TIMEOUT = 60.0          # seconds without a byte before a download gives up
_CHUNK = 1 << 20
_SCHEMES = ("http", "https", "file")


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One public file: ``name`` (for ``rom-fast data download NAME``), ``path`` (relative, in
    the cache), ``url`` (its original source), ``size`` (bytes), ``sha256`` (hex), ``groups``
    (other names that select it) and ``use`` (what reads it)."""

    name: str
    path: str
    url: str
    size: int
    sha256: str
    groups: tuple
    use: str


def _github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_PYTORCH = ("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8")
_PIQA = ("ybisk/ybisk.github.io", "21edab439af693b961be2f069e8690a88d3b4e37")
_FOUNDRY = ("mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d")
_HELLASWAG = ("klosax/hellaswag_text_data", "1105d370f8340eac3c63a91fd1fa58e8999f9505")
_CHAR_RNN = ("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e")
_EXLLAMA = ("turboderp/exllamav2", "b9c025b4b1ee78c0d34e700f2e474a02dfb13c90")
_ADAPTERS = ("AGI-Edgerunners/LLM-Adapters", "816657208af4db747803f87ba40a4c71383fed7a")


def _entry(name, path, source, source_path, size, sha256, groups, use) -> DataFile:
    return DataFile(name, path, _github(*source, source_path), size, sha256, groups, use)


#: Every file rom_fast reads, in the order ``rom-fast data list`` shows them.
MANIFEST = (
    _entry("wikitext2", "wikitext2/tokenized/test.txt", _PYTORCH, "word_language_model/data/wikitext-2/test.txt",
           1256449, "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
           ("perplexity",), "WikiText-2 perplexity in compress and eval"),
    _entry("wiki", "calibration_text/exllamav2_wiki.utf8", _EXLLAMA, "exllamav2/conversion/standard_cal_data/wiki.utf8",
           2093275, "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
           ("calibration",), "--calibration wiki, the default when present"),
    _entry("c4", "calibration_text/exllamav2_c4.utf8", _EXLLAMA, "exllamav2/conversion/standard_cal_data/c4.utf8",
           332173, "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
           ("calibration",), "--calibration c4"),
    _entry("shakespeare", "calibration_text/tinyshakespeare_input.txt", _CHAR_RNN, "data/tinyshakespeare/input.txt",
           1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
           ("calibration",), "--calibration shakespeare"),
    _entry("boolq-train", "llm-adapters/boolq_train.json", _ADAPTERS, "dataset/boolq/train.json",
           2599507, "5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83",
           ("combination", "calibration"), "--calibration combination"),
    _entry("arc_easy-train", "llm-adapters/arc_easy_train.json", _ADAPTERS, "dataset/ARC-Easy/train.json",
           1092324, "6a06cece3dec32f4fb1c1b0fc29dab14be7cf3053b417290dbc6cd845359f5ff",
           ("combination", "calibration"), "--calibration combination"),
    _entry("arc_challenge-train", "llm-adapters/arc_challenge_train.json", _ADAPTERS, "dataset/ARC-Challenge/train.json",
           585556, "a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb",
           ("combination", "calibration"), "--calibration combination"),
    _entry("boolq", "boolq/llm-foundry_boolq.jsonl", _FOUNDRY,
           "scripts/eval/local_data/reading_comprehension/boolq.jsonl",
           2210395, "454ff101e614370bb1807fe7ebbda6fdb57e794b9662cc1ccae211bf1ff626c8",
           ("tasks",), "zero-shot task boolq"),
    _entry("piqa", "piqa/valid.jsonl", _PIQA, "piqa/data/valid.jsonl",
           495929, "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
           ("tasks",), "zero-shot task piqa"),
    _entry("piqa-labels", "piqa/valid-labels.lst", _PIQA, "piqa/data/valid-labels.lst",
           3676, "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
           ("tasks", "piqa"), "zero-shot task piqa, labels"),
    _entry("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", _HELLASWAG, "hellaswag_val_full.txt.bz2",
           1964544, "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
           ("tasks",), "zero-shot task hellaswag"),
    _entry("winogrande", "winogrande/llm-foundry_winogrande.jsonl", _FOUNDRY,
           "scripts/eval/local_data/language_understanding/winogrande.jsonl",
           312369, "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7",
           ("tasks",), "zero-shot task winogrande"),
    _entry("arc_easy", "llm-adapters/arc_easy_test.json", _ADAPTERS, "dataset/ARC-Easy/test.json",
           1157216, "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc",
           ("tasks",), "zero-shot task arc_easy"),
    _entry("arc_challenge", "llm-adapters/arc_challenge_test.json", _ADAPTERS, "dataset/ARC-Challenge/test.json",
           622510, "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7",
           ("tasks",), "zero-shot task arc_challenge"),
)

_BY_NAME = {f.name: f for f in MANIFEST}


class DownloadError(OSError):
    """A file that could not be fetched and verified; the message names it and says why."""


# ----------------------------------------------------------------------------- the cache


def data_dir() -> Path:
    """``$ROM_FAST_DATA``, else ``$XDG_CACHE_HOME/rom_fast``, else ``~/.cache/rom_fast``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "rom_fast"


def entry(name: str) -> DataFile:
    """The manifest entry called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no data file called {name!r} (known: {', '.join(_BY_NAME)})") from None


def select(names: Iterable[str] = ()) -> List[DataFile]:
    """The entries named, or in a group named (``perplexity``, ``calibration``,
    ``combination``, ``tasks``, ``piqa``), in manifest order; every entry for no names."""
    names = list(names)
    known = set(_BY_NAME) | {g for f in MANIFEST for g in f.groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown data name(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [f for f in MANIFEST if not names or f.name in names or set(f.groups) & set(names)]


def local_path(file: DataFile, directory=None) -> Path:
    """Where ``file`` lives under ``directory`` (default :func:`data_dir`), confined to it."""
    root = Path(directory if directory is not None else data_dir()).expanduser()
    parts = file.path.split("/")        # checked as written: Path() would drop "." and "//"
    if "\\" in file.path or any(p in ("", ".", "..") for p in parts) or Path(file.path).is_absolute():
        raise ValueError(f"data file {file.name}: path {file.path!r} is not a plain relative path")
    return root.joinpath(*parts)


def fetch_command(names: Iterable[str], directory=None) -> str:
    """The command that fetches ``names`` into ``directory`` (the cache unless another one)."""
    command = " ".join(["rom-fast data download", *names])
    if directory is not None and Path(directory).expanduser() != data_dir():
        command += f" --dir {shlex.quote(str(directory))}"
    return command


def require(names: Iterable[str], directory=None) -> List[Path]:
    """The local paths of the files ``names``; any missing is one FileNotFoundError, in one
    line, naming every missing file and the one command that fetches them."""
    files = [entry(name) for name in names]
    absent = missing(files, directory)
    if absent:
        raise FileNotFoundError(missing_message(absent, directory))
    return [local_path(f, directory) for f in files]


def missing_message(files: List[DataFile], directory=None) -> str:
    root = Path(directory) if directory is not None else data_dir()
    what = ", ".join(f"{f.path} (for {f.use})" for f in files)
    return (f"data file{'s' if len(files) > 1 else ''} {what} missing from {root} (or set ${DATA_ENV} to a "
            f"prepared copy); fetch: {fetch_command([f.name for f in files], directory)}")


def missing(files: Iterable[DataFile], directory=None) -> List[DataFile]:
    """The entries of ``files`` that are not present under ``directory``."""
    return [f for f in files if not local_path(f, directory).is_file()]


def status(file: DataFile, directory=None, verify: bool = False) -> str:
    """``"present"``, ``"missing"``, ``"wrong size"`` or (``verify``) ``"wrong sha256"``."""
    path = local_path(file, directory)
    if not path.is_file():
        return "missing"
    if path.stat().st_size != file.size:
        return "wrong size"
    if verify and _sha256_of(path) != file.sha256:
        return "wrong sha256"
    return "present"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- downloading


def source_url(file: DataFile, base_url: Optional[str] = None) -> str:
    """``file``'s original URL, or ``BASE/<path in the cache>`` for a base URL (argument, else
    ``$ROM_FAST_DATA_URL``)."""
    base = base_url if base_url is not None else os.environ.get(URL_ENV) or None
    url = file.url if base is None else base.rstrip("/") + "/" + urllib.parse.quote(file.path)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ValueError(f"data URL {url!r}: scheme {scheme!r} is not one of {', '.join(_SCHEMES)}")
    return url


def fetch(file: DataFile, directory=None, base_url: Optional[str] = None,
          timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> bool:
    """Downloads ``file`` into ``directory`` unless a verified copy is there (``force``:
    always). Returns True when it downloaded. Raises :class:`DownloadError` (one line naming
    the file) when the transfer fails or its size or sha256 differ; nothing partial remains."""
    target = local_path(file, directory)
    if not force and status(file, directory, verify=True) == "present":
        return False
    url = source_url(file, base_url)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".download")
    try:
        with os.fdopen(fd, "wb") as out:
            _transfer(file, url, out, timeout)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:     # Ctrl-C included: never leave a partial file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _transfer(file: DataFile, url: str, out, timeout: float) -> None:
    """Streams ``url`` into ``out``: at most ``file.size`` bytes are accepted, then size and
    sha256 are checked. Every failure becomes a one-line DownloadError."""
    def fail(reason: str) -> DownloadError:
        return DownloadError(f"data file {file.name} ({file.path}) from {url}: {reason}")

    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.strip() != str(file.size):
                raise fail(f"the server announces {announced.strip()} bytes, expected {file.size}")
            while received <= file.size:
                chunk = response.read(min(_CHUNK, file.size + 1 - received))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as err:
        raise fail(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise fail(f"no connection within {timeout:g} s (timed out)") from None
        raise fail(f"cannot connect ({err.reason})") from None
    except TimeoutError:
        raise fail(f"no data for {timeout:g} s (timed out after {received} of {file.size} bytes)") from None
    except (OSError, http.client.HTTPException) as err:    # reset connections, bad status lines, ...
        raise fail(f"transfer failed after {received} of {file.size} bytes ({type(err).__name__}: {err})") from None
    if received < file.size:
        raise fail(f"transfer ended after {received} of {file.size} bytes (truncated)")
    if received > file.size:
        raise fail(f"more than the expected {file.size} bytes")
    if digest.hexdigest() != file.sha256:
        raise fail(f"sha256 {digest.hexdigest()} differs from the expected {file.sha256}")


def ensure(names: Iterable[str], directory=None, base_url: Optional[str] = None,
           timeout: float = DEFAULT_TIMEOUT, report=None) -> List[Path]:
    """Fetches whichever of the named files (or groups) are missing; ``report(line)`` is told
    about each download. Returns their local paths. For ``--download`` on a command."""
    files = select(names)
    for file in missing(files, directory):
        if report is not None:
            report(f"rom_fast: fetching {file.path} ({file.size / 1e6:.1f} MB) from {source_url(file, base_url)}")
        fetch(file, directory, base_url, timeout)
    return [local_path(f, directory) for f in files]
