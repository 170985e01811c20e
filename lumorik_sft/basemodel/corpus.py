"""An offline pretraining corpus: documentation already on this machine, assembled the same way everywhere.

The corpus is documentation already on this machine, under permissive licenses: the docstrings
of Python's standard library and its `pydoc_data.topics` (PSF-2.0), and the docstrings of pinned
dependencies of this project (numpy, tokenizers, transformers, ...). Docstrings are read by
*parsing* source files with `ast`, never by importing them: no import side effects (`this`,
`antigravity`), and the text does not depend on what else happens to be imported. The few
standard-library modules written in C (`math`, `itertools`, `builtins`) are read with `inspect`.

Run from Python::

    from lumorik_sft.basemodel.corpus import assemble_corpus
    corpus = assemble_corpus()                  # ~13.5M characters
    print(corpus.sha256, corpus.sources)

The knowledge-bearing SFT task whose answers live in this corpus is `lumorik_sft.basemodel.doc_qa`.

Everything is deterministic: files are read in a fixed order, each docstring is cleaned with
`inspect.cleandoc` and kept once (first occurrence), validation text is held out by module with a
stable hash, and the assembled text has a SHA-256 that the model card records.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import platform
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SOURCES",
    "PERMISSIVE_LICENSES",
    "Corpus",
    "CorpusSource",
    "Document",
    "assemble_corpus",
    "is_validation_module",
    "iter_documents",
]

# SPDX identifiers we accept. MPL-2.0 is file-level copyleft (tqdm); quoting its docstrings as
# training text is permitted, and the card lists it so that a user can drop the source.
PERMISSIVE_LICENSES = frozenset(
    {
        "PSF-2.0",
        "MIT",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "Apache-2.0",
        "MPL-2.0",
        "0BSD",
        "Zlib",
        "CC0-1.0",
        "ISC",
        "BSL-1.0",
        "CNRI-Python",
        "LLVM-exception",
    }
)
_CLASSIFIER_SPDX = {
    "Apache Software License": "Apache-2.0",
    "MIT License": "MIT",
    "BSD License": "BSD-3-Clause",
    "Python Software Foundation License": "PSF-2.0",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
}
_LICENSE_TEXT_SPDX = {
    "apache 2.0": "Apache-2.0",
    "apache-2.0": "Apache-2.0",
    "mit": "MIT",
    "bsd": "BSD-3-Clause",
    "mpl-2.0": "MPL-2.0",
}

# Folders never read: tests (huge, repetitive), GUI and demo code, vendored copies, bundled wheels.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "testing",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "_vendor",
        "vendored",
        "pydoc_data",
        "lib-dynload",
        "__phello__",
        "config-3.11-x86_64-linux-gnu",
    }
)
# Modules whose *import* has side effects; we never import them, and skip them anyway.
_SKIP_MODULES = frozenset({"antigravity", "this", "turtle", "__hello__", "_pydev_bundle"})
# Standard-library modules written in C: their documentation exists only at run time.
STDLIB_C_MODULES = (
    "array",
    "binascii",
    "builtins",
    "cmath",
    "errno",
    "gc",
    "itertools",
    "marshal",
    "math",
    "time",
    "unicodedata",
    "zlib",
)
STDLIB_SOURCE = "python-stdlib"
_TOPICS = "pydoc_data.topics"


@dataclass(frozen=True)
class CorpusSource:
    """One origin of text, read in a fixed way.

    `kind` is "stdlib" (standard-library docstrings), "topics" (`pydoc_data.topics`, the text of
    Python's language reference) or "package" (docstrings of an installed distribution whose
    license is read from its metadata). `max_chars` caps a large source so that no single package
    dominates; capped sources keep whole modules picked in a stable pseudo-random order.
    """

    name: str
    kind: str = "package"
    max_chars: int | None = None


# ~13.5M characters: about 4M tokens (3.3 characters per token with the 4,096-token BPE), seen
# about 3.5 times in the default 20-minute recipe. Standard library and language reference come
# first: they carry the facts the knowledge task asks about, and are never capped.
DEFAULT_SOURCES: tuple[CorpusSource, ...] = (
    CorpusSource(STDLIB_SOURCE, "stdlib"),
    CorpusSource(_TOPICS, "topics"),
    CorpusSource("numpy", max_chars=1_700_000),
    CorpusSource("tokenizers"),
    CorpusSource("safetensors"),
    CorpusSource("tqdm"),
    CorpusSource("sacrebleu"),
    CorpusSource("datasets"),
    CorpusSource("huggingface_hub", max_chars=1_000_000),
    CorpusSource("transformers", max_chars=4_500_000),
    CorpusSource("torch", max_chars=3_000_000),
)


@dataclass(frozen=True)
class Entry:
    """One documented object: `textwrap.dedent` with signature `(text)` and its cleaned docstring."""

    name: str
    signature: str
    doc: str
    kind: str  # "module", "class", "function" or "method"


@dataclass(frozen=True)
class Document:
    """The documentation of one module (or one language-reference topic), the unit we hold out."""

    source: str
    module: str
    entries: tuple[Entry, ...]

    @property
    def text(self) -> str:
        return render_entries(self.entries)


@dataclass
class Corpus:
    """An assembled corpus: training and held-out texts, where they came from, and a hash."""

    train_texts: list[str]
    val_texts: list[str]
    sources: list[dict[str, Any]]
    sha256: str
    train_modules: list[str] = field(default_factory=list)
    val_modules: list[str] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return sum(map(len, self.train_texts)) + sum(map(len, self.val_texts))

    def manifest(self) -> dict[str, Any]:
        """The machine-readable record a model card cites."""
        return {
            "sha256": self.sha256,
            "chars": self.chars,
            "train_documents": len(self.train_texts),
            "train_chars": sum(map(len, self.train_texts)),
            "val_documents": len(self.val_texts),
            "val_chars": sum(map(len, self.val_texts)),
            "val_modules": list(self.val_modules),
            "python": platform.python_version(),
            "sources": list(self.sources),
        }


def render_entries(entries: Iterable[Entry]) -> str:
    """The text the model reads: a pydoc-like header line (name and signature), then the doc."""
    blocks = []
    for e in entries:
        head = f"Module {e.name}" if e.kind == "module" else f"{e.name}{e.signature}"
        blocks.append(f"{head}\n{e.doc}")
    return "\n\n".join(blocks)


def stable_hash(text: str) -> int:
    """A hash that, unlike `hash()`, is the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_validation_module(source: str, module: str, val_fraction: float) -> bool:
    """Whether a module is held out for validation: a stable hash, so every run agrees."""
    return stable_hash(f"val:{source}:{module}") < val_fraction * 2**64


def clean_doc(doc: str | None) -> str:
    """`inspect.cleandoc`, trailing spaces stripped and blank runs collapsed; '' for no doc."""
    if not doc or not doc.strip():
        return ""
    text = inspect.cleandoc(doc)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------- licenses


def _is_spdx(expression: str) -> bool:
    terms = [t for t in re.split(r"\s+(?:AND|OR|WITH)\s+|[()]", expression) if t.strip()]
    return bool(terms) and all(t.strip() in PERMISSIVE_LICENSES for t in terms)


def _spdx(dist: str) -> tuple[str, str]:
    """(license as SPDX ids, metadata field it came from) of an installed distribution.

    Order: `License-Expression` (PEP 639), a `License` field that already is an SPDX expression
    (tqdm's "MPL-2.0 AND MIT"), the OSI classifiers, then a known free-text name.
    """
    meta = importlib.metadata.metadata(dist)
    if meta.get("License-Expression"):
        return str(meta["License-Expression"]), "License-Expression"
    text = (meta.get("License") or "").strip()
    if text and _is_spdx(text):
        return text, "License"
    found = [
        _CLASSIFIER_SPDX[c.rsplit(" :: ", 1)[1]]
        for c in meta.get_all("Classifier") or []
        if c.startswith("License :: OSI Approved :: ") and c.rsplit(" :: ", 1)[1] in _CLASSIFIER_SPDX
    ]
    if found:
        return " AND ".join(dict.fromkeys(found)), "Classifier"
    for key, spdx in _LICENSE_TEXT_SPDX.items():
        if text.lower().startswith(key):
            return spdx, "License"
    raise ValueError(
        f"cannot read a license for {dist!r} from its metadata; remove it from the sources or "
        "add a CorpusSource for a package whose license is declared"
    )


def check_license(name: str, expression: str) -> None:
    """Refuse a source unless every term of its license expression is on the permissive list."""
    terms = {t for t in re.split(r"\s+(?:AND|OR|WITH)\s+|[()]", expression) if t.strip()}
    bad = sorted(t.strip() for t in terms if t.strip() not in PERMISSIVE_LICENSES)
    if bad:
        raise ValueError(
            f"source {name!r} has license {expression!r} with non-permissive terms {bad}; "
            "drop it from the corpus sources"
        )


def source_info(source: CorpusSource) -> dict[str, Any]:
    """Name, version and license of a source, read from this machine."""
    if source.kind in ("stdlib", "topics"):
        version, lic, origin = platform.python_version(), "PSF-2.0", "Python's LICENSE"
    else:
        version = importlib.metadata.version(source.name)
        lic, origin = _spdx(source.name)
    check_license(source.name, lic)
    return {
        "name": source.name,
        "kind": source.kind,
        "version": version,
        "license": lic,
        "license_from": origin,
    }


# ---------------------------------------------------------------- reading docstrings


def _module_files(root: Path, prefix: str) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every readable .py file under root, sorted by name."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        parts = [*rel.parts[:-1], rel.stem] if rel.stem != "__init__" else list(rel.parts[:-1])
        if not all(p.isidentifier() for p in parts):
            continue
        module = ".".join(p for p in (prefix, *parts) if p)
        if module.split(".")[0] in _SKIP_MODULES or module.endswith("__main__"):
            continue
        out.append((module, path))
    return sorted(out)


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return f"({ast.unparse(node.args)})"
    return ""


def _walk_defs(body: Sequence[ast.stmt], prefix: str, in_class: bool = False) -> Iterator[Entry]:
    """Classes, functions and methods in definition order, with qualified names.

    Only top-level and class-body definitions: helpers nested inside functions are not API.
    """
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}.{node.name}"
            doc = clean_doc(ast.get_docstring(node, clean=False))
            is_class = isinstance(node, ast.ClassDef)
            kind = "class" if is_class else ("method" if in_class else "function")
            if doc:
                yield Entry(name, _signature(node), doc, kind)
            if is_class:
                yield from _walk_defs(node.body, name, in_class=True)


@cache
def _parse_file(path: str, module: str) -> tuple[Entry, ...]:
    """Docstring entries of one source file (cached: the corpus and the QA task both read it)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ()  # a file this Python cannot parse (other version, template) carries no docs
    entries = []
    doc = clean_doc(ast.get_docstring(tree, clean=False))
    if doc:
        entries.append(Entry(module, "", doc, "module"))
    entries.extend(_walk_defs(tree.body, module))
    return tuple(entries)


def _c_module_entries(module: str) -> tuple[Entry, ...]:
    """Docstrings of a C standard-library module, read with `inspect` (they exist nowhere else)."""
    mod = importlib.import_module(module)
    entries = []
    doc = clean_doc(mod.__doc__)
    if doc:
        entries.append(Entry(module, "", doc, "module"))
    for name, obj in sorted(vars(mod).items()):
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", module) != module:
            continue  # re-exports and objects other code added (site's `exit`, ...)
        entries.extend(_c_object_entries(f"{module}.{name}", obj))
    return tuple(entries)


def _c_object_entries(name: str, obj: Any) -> list[Entry]:
    def sig(o: Any) -> str:
        try:
            return str(inspect.signature(o))
        except (TypeError, ValueError):
            return ""

    kind = "class" if inspect.isclass(obj) else "function"
    out = []
    doc = clean_doc(obj.__doc__)
    if doc:
        out.append(Entry(name, "" if kind == "class" else sig(obj), doc, kind))
    if kind == "class":
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not inspect.isroutine(member):
                continue
            mdoc = clean_doc(getattr(member, "__doc__", None))
            if mdoc:
                out.append(Entry(f"{name}.{attr}", sig(member), mdoc, "method"))
    return out


def _package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds the folder; does not run the package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {name!r} is not installed; drop it from the corpus sources")
    return Path(next(iter(spec.submodule_search_locations)))


def _raw_documents(source: CorpusSource) -> list[tuple[str, Any]]:
    """(module, loader) pairs of a source; loaders are lazy so that a cap skips parsing."""
    if source.kind == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [(m, p) for m, p in _module_files(root, "") if m.split(".")[0] != "encodings"]
        docs: list[tuple[str, Any]] = [(m, (str(p), m)) for m, p in files]
        docs += [(m, ("c", m)) for m in STDLIB_C_MODULES]
        return sorted(docs)
    if source.kind == "topics":
        from pydoc_data.topics import topics

        return [(f"{_TOPICS}:{k}", ("topic", k)) for k in sorted(topics)]
    root = _package_root(source.name)
    return [(m, (str(p), m)) for m, p in _module_files(root, source.name)]


def _load(loader: tuple[str, str]) -> tuple[Entry, ...]:
    kind, arg = loader
    if kind == "c":
        return _c_module_entries(arg)
    if kind == "topic":
        from pydoc_data.topics import topics

        doc = clean_doc(topics[arg])
        return (Entry(arg, "", doc, "topic"),) if doc else ()
    return _parse_file(kind, arg)


def iter_documents(
    source: CorpusSource,
    *,
    max_chars: int | None = None,
    seen: set[str] | None = None,
    min_one: bool = True,
) -> Iterator[Document]:
    """Documents of one source, each docstring kept only once, within `max_chars`.

    Uncapped sources are read in name order. A capped source is read in a stable pseudo-random
    order of module names, so that a cap keeps a spread of the package rather than its first
    letters. `seen` carries docstring hashes across sources: a docstring copied into many modules
    (common in transformers) is kept at its first occurrence. With `min_one` the first document is
    kept even if it alone exceeds the cap, so that a tiny cap still yields text.
    """
    seen = set() if seen is None else seen
    cap = min(c for c in (source.max_chars, max_chars, 2**62) if c is not None)
    raw = _raw_documents(source)
    if cap < 2**62:
        raw.sort(key=lambda item: stable_hash(f"order:{source.name}:{item[0]}"))
    total = 0
    for module, loader in raw:
        kept, keys = [], set()
        for e in _load(loader):
            key = hashlib.sha256(e.doc.encode("utf-8")).hexdigest()
            if key not in seen and key not in keys:
                keys.add(key)
                kept.append(e)
        if not kept:
            continue
        doc = Document(source.name, module, tuple(kept))
        if total + len(doc.text) > cap and (total or not min_one):
            return
        total += len(doc.text)
        seen |= keys
        yield doc


def assemble_corpus(
    sources: Sequence[CorpusSource] = DEFAULT_SOURCES,
    *,
    max_chars: int | None = None,
    val_fraction: float = 0.02,
) -> Corpus:
    """Read every source, hold out whole modules for validation, and hash the result.

    Held-out modules are chosen by a stable hash of their names (about `val_fraction` of them), so
    validation text is never a near-copy of training text from the same module. If a tiny corpus
    holds out nothing, the module with the lowest hash is held out. `max_chars` caps the total,
    filled in source order.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    seen: set[str] = set()
    docs: list[Document] = []
    infos = []
    for source in sources:
        left = None if max_chars is None else max_chars - sum(len(d.text) for d in docs)
        if left is not None and left <= 0:
            break
        info = source_info(source)
        src_docs = sorted(
            iter_documents(source, max_chars=left, seen=seen, min_one=not docs), key=lambda d: d.module
        )
        info["documents"] = len(src_docs)
        info["chars"] = sum(len(d.text) for d in src_docs)
        infos.append(info)
        docs.extend(src_docs)
    if not docs:
        raise ValueError("the corpus is empty; raise max_chars or add sources")
    val_mask = [is_validation_module(d.source, d.module, val_fraction) for d in docs]
    if not any(val_mask) or all(val_mask):
        pick = min(range(len(docs)), key=lambda i: stable_hash(f"val:{docs[i].source}:{docs[i].module}"))
        val_mask = [i == pick for i in range(len(docs))]
    digest = hashlib.sha256()
    for d, held in zip(docs, val_mask, strict=True):
        digest.update(f"{'val' if held else 'train'}\0{d.source}\0{d.module}\0".encode())
        digest.update(d.text.encode("utf-8") + b"\0")
    return Corpus(
        train_texts=[d.text for d, v in zip(docs, val_mask, strict=True) if not v],
        val_texts=[d.text for d, v in zip(docs, val_mask, strict=True) if v],
        sources=infos,
        sha256=digest.hexdigest(),
        train_modules=[d.module for d, v in zip(docs, val_mask, strict=True) if not v],
        val_modules=[d.module for d, v in zip(docs, val_mask, strict=True) if v],
    )
