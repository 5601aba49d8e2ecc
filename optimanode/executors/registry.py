"""The scan of the models directory: which GGUF files are models, which are broken, which are still arriving.

How a scan works:

* **Walk.** ``models_dir`` is walked recursively with ``os.scandir`` (sorted, so results are
  deterministic). Files whose name ends in ``.gguf`` are candidates; names starting with ``.`` are
  skipped (hidden files, temporary files of copy tools). Symlinks are followed, but every
  directory is entered once by (device, inode), so a symlink loop ends the descent. A directory
  that cannot be listed lands in ``errors`` and the rest is scanned: one bad file or directory
  never makes a scan raise.
* **Identity.** ``executor_id_for`` derives the executor id from the path relative to
  ``models_dir``: a slug of the stem plus 8 hex of the SHA-1 of the relative path. Renaming or
  moving a file therefore gives a new executor (the old one goes missing); the content identity,
  ``sha256``, is separate and computed by the node with ``sha256_of``.
* **Stability.** A file still being copied must not be reported as truncated. A file is *stable*
  when its (size, mtime_ns) equal what the previous scan by this Registry saw, or equal what
  ``known`` recorded, or its mtime is more than ``settle_s`` seconds before ``clock()``. Anything
  else is *pending*: listed in ``pending`` and looked at again next scan. A split model waits
  until every part is stable, and all its present parts are listed meanwhile.
* **Cache through ``known``.** ``known`` maps executor id → the ModelInfo recorded last time. A
  model whose path, parts, total size and max mtime are unchanged is taken from ``known`` as is
  (``sha256`` included) without opening the file: that is what makes rescanning 10,000 files
  cheap. A changed file has its header re-read and its ``sha256`` cleared. Entries with no tensors
  (as every invalid entry has) are never trusted and are re-read.
* **Split models.** ``name-00001-of-00003.gguf`` ... form one executor keyed on the first part;
  other parts are never registered on their own. All parts must be present and stable; each is
  checked for truncation; their split.* keys must agree with their names; the tensor and
  parameter counts cover all parts; ``files`` lists every part in order, ``size_bytes`` is their
  total and ``mtime_ns`` their latest.
* **Invalid reasons** come from the header reader (not a GGUF, unsupported version, header past
  the end, truncated, vocabulary-only, unknown tensor type) or from the split checks ("split
  model: part 2 of 3 missing"); they are shown to the operator as they are.

The scan is synchronous and keeps per-instance state (what it saw last), so run one scan at a
time per Registry (the node runs it in a worker thread).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat as stat_mod
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from optimanode.errors import ModelFileError
from optimanode.executors import gguf
from optimanode.protocol import ModelInfo

# Exactly the names llama.cpp derives for the other parts (llama_split_path: "%s-%05d-of-%05d.gguf").
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_SLUG_RE = re.compile(r"[^a-z0-9]+")


@dataclass
class ScanResult:
    # Valid models whose files are stable, by executor id.
    models: dict[str, ModelInfo] = field(default_factory=dict)
    # Unusable models by executor id: a ModelInfo with path/files/size/mtime, and the reason.
    invalid: dict[str, tuple[ModelInfo, str]] = field(default_factory=dict)
    # Files still being written; skipped this scan.
    pending: list[str] = field(default_factory=list)
    # Paths that could not be scanned at all (unlistable directory, broken symlink, id clash) → why.
    errors: dict[str, str] = field(default_factory=dict)
    # Headers parsed by this scan (the rest came from ``known``).
    headers_read: int = 0


def _slug(stem: str) -> str:
    return _SLUG_RE.sub("-", stem.lower()).strip("-")[:64].rstrip("-") or "model"


def _id(rel: str, stem: str) -> str:
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{_slug(stem)}-{digest}"


def _split_id(rel: str) -> tuple[str, str, int, int] | None:
    """For a split part: (stem without the suffix, relative path of part 1, part number, part count)."""
    m = SPLIT_RE.search(rel)
    if m is None:
        return None
    head = rel[:m.start()]
    return head.rsplit("/", 1)[-1], f"{head}-00001-of-{m.group(2)}.gguf", int(m.group(1)), int(m.group(2))


def executor_id_for(models_dir: Path, path: Path) -> str:
    """The stable executor id of the model file ``path`` under ``models_dir``.

    A lower-case slug of the file stem, ``-``, and the first 8 hex digits of the SHA-1 of the
    path relative to ``models_dir``. For a split model both come from the first part (stem without
    ``-00001-of-0000N``), so every part maps to the same id. The id depends on the path only:
    renaming or moving a file gives a new executor.
    """
    rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(models_dir)).as_posix()
    split = _split_id(rel)
    if split is not None:
        return _id(split[1], split[0])
    name = rel.rsplit("/", 1)[-1]
    return _id(rel, name[:-5] if name.lower().endswith(".gguf") else Path(name).stem)


def sha256_of(files: Sequence[str], chunk: int = 8 << 20) -> str:
    """Hex SHA-256 over the contents of ``files`` in order (all parts of a split model)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


@dataclass(slots=True)
class _File:
    rel: str
    path: str
    size: int
    mtime_ns: int


class Registry:
    """Scans ``models_dir``; remembers what each file looked like at its previous scan."""

    def __init__(self, models_dir: Path, settle_s: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self.models_dir = Path(os.path.abspath(models_dir))
        self.settle_s = settle_s
        self.clock = clock
        self._seen: dict[str, tuple[int, int]] = {}

    # -- walk ------------------------------------------------------------------------------

    def _walk(self, errors: dict[str, str]) -> list[_File]:
        root = str(self.models_dir)
        out: list[_File] = []
        try:
            st = os.stat(root)
        except OSError as exc:
            errors[root] = f"cannot read models directory: {exc.strerror or exc}"
            return out
        visited = {(st.st_dev, st.st_ino)}
        stack = [(root, "")]
        while stack:
            dirpath, prefix = stack.pop()
            try:
                with os.scandir(dirpath) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                errors[dirpath] = f"cannot read directory: {exc.strerror or exc}"
                continue
            subdirs = []
            for e in entries:
                name = e.name
                if name.startswith("."):
                    continue
                if not _utf8(name):
                    # The journal, the link and the logs carry paths as UTF-8 text; a name from a
                    # Latin-1 archive or share cannot be one. Listed (escaped) instead of registered.
                    errors[_shown(e.path)] = ("the name is not valid UTF-8: rename it (the node records paths as"
                                              " UTF-8 text)")
                    continue
                try:
                    if e.is_dir():
                        s = e.stat()
                        key = (s.st_dev, s.st_ino)
                        if key not in visited:  # a symlink loop, or a second link to a tree
                            visited.add(key)
                            subdirs.append((e.path, f"{prefix}{name}/"))
                        continue
                    if not name.lower().endswith(".gguf"):
                        continue
                    s = e.stat()
                except OSError as exc:
                    errors[e.path] = f"cannot stat: {exc.strerror or exc}" + (
                        " (broken symlink?)" if isinstance(exc, FileNotFoundError) else "")
                    continue
                if stat_mod.S_ISREG(s.st_mode):
                    out.append(_File(prefix + name, e.path, s.st_size, s.st_mtime_ns))
            stack.extend(reversed(subdirs))
        return out

    # -- scan ------------------------------------------------------------------------------

    def scan(self, known: Mapping[str, ModelInfo] | None = None) -> ScanResult:
        """Walk the directory once and classify every model file; never raises for a bad file."""
        known = known or {}
        result = ScanResult()
        files = self._walk(result.errors)
        cutoff_ns = int((self.clock() - self.settle_s) * 1e9)
        seen = self._seen
        self._seen = {f.path: (f.size, f.mtime_ns) for f in files}

        singles: list[tuple[str, _File]] = []
        splits: dict[str, tuple[str, int, dict[int, _File]]] = {}
        for f in files:
            split = _split_id(f.rel)
            if split is None:
                singles.append((_id(f.rel, f.rel.rsplit("/", 1)[-1][:-5]), f))
            else:
                stem, first_rel, no, count = split
                splits.setdefault(_id(first_rel, stem), (first_rel, count, {}))[2][no] = f

        owner: dict[str, str] = {}

        def claim(eid: str, path: str) -> bool:
            # Two paths with one id (same slug, SHA-1 prefix clash): the first in walk order keeps it.
            other = owner.setdefault(eid, path)
            if other != path:
                result.errors[path] = f"executor id {eid} is already used by {other}; rename one of them"
                return False
            return True

        def moving(path: str, fs: list[_File], k: ModelInfo | None) -> list[str]:
            # Unchanged since ``known`` was recorded counts as stable too (e.g. after a node restart).
            if k is not None and _same(k, path, fs):
                return []
            return [f.path for f in fs if seen.get(f.path) != (f.size, f.mtime_ns) and f.mtime_ns > cutoff_ns]

        for eid, f in singles:
            if claim(eid, f.path):
                k = known.get(eid)
                if wait := moving(f.path, [f], k):
                    result.pending.extend(wait)
                else:
                    self._single(eid, f, k, result)

        for eid, (first_rel, count, parts) in splits.items():
            first_path = os.path.join(self.models_dir, first_rel)
            if claim(eid, first_path):
                k = known.get(eid)
                if moving(first_path, _ordered(parts), k):
                    # The whole model waits, so every present part is listed (the first included).
                    result.pending.extend(p.path for p in _ordered(parts))
                else:
                    self._split(eid, first_path, count, parts, k, result)

        result.pending.sort()
        return result

    def _read(self, path: str, result: ScanResult) -> gguf.GGUFHeader:
        result.headers_read += 1
        try:
            return gguf.read_header(path)
        except (FileNotFoundError, ModelFileError):
            raise
        except OSError as exc:
            raise ModelFileError(path, f"cannot read: {exc.strerror or exc}") from None
        except Exception as exc:  # a reader bug on one odd file must not stop the scan of all the others
            raise ModelFileError(path, f"cannot parse header ({type(exc).__name__}: {exc})") from exc

    def _single(self, eid: str, f: _File, k: ModelInfo | None, result: ScanResult) -> None:
        if k is not None and _unchanged(k, f.path, [f]):
            result.models[eid] = k
            return
        base = ModelInfo(path=f.path, files=[f.path], size_bytes=f.size, mtime_ns=f.mtime_ns)
        try:
            h = self._read(f.path, result)
        except FileNotFoundError:
            return  # removed between the listing and the read: gone from this result
        except ModelFileError as exc:
            result.invalid[eid] = (base, exc.reason)
            return
        if h.split_count > 1:
            result.invalid[eid] = (base, f"part {h.split_no + 1} of a {h.split_count}-part split model, but its "
                                         f"name lacks the -{h.split_no + 1:05d}-of-{h.split_count:05d} suffix")
            return
        result.models[eid] = _info(base, h, h.tensor_count, h.parameter_count)

    def _split(self, eid: str, first_path: str, count: int, parts: dict[int, _File],
               k: ModelInfo | None, result: ScanResult) -> None:
        ordered = _ordered(parts)
        base = ModelInfo(path=first_path, files=[p.path for p in ordered],
                         size_bytes=sum(p.size for p in ordered), mtime_ns=max(p.mtime_ns for p in ordered))
        beyond = sorted(i for i in parts if not 1 <= i <= count)
        missing = [i for i in range(1, count + 1) if i not in parts]
        if beyond:
            result.invalid[eid] = (base, f"split model: file name says part {beyond[0]} of {count}")
            return
        if missing:
            which = "part " + str(missing[0]) if len(missing) == 1 else "parts " + ", ".join(map(str, missing))
            result.invalid[eid] = (base, f"split model: {which} of {count} missing")
            return
        if k is not None and _unchanged(k, first_path, ordered):
            result.models[eid] = k
            return
        headers = []
        for i, p in enumerate(ordered, 1):
            try:
                h = self._read(p.path, result)
            except FileNotFoundError:
                result.invalid[eid] = (base, f"split model: part {i} of {count} missing")
                return
            except ModelFileError as exc:
                result.invalid[eid] = (base, f"split model: part {i} of {count}: {exc.reason}")
                return
            if h.split_count != count or h.split_no != i - 1:
                result.invalid[eid] = (base, f"split model: part {i} of {count} says it is part {h.split_no + 1} "
                                             f"of {h.split_count} (split.no, split.count)")
                return
            headers.append(h)
        first = headers[0]
        tensors = sum(h.tensor_count for h in headers)
        if tensors == 0:
            result.invalid[eid] = (base, "vocabulary-only GGUF: holds no weights")
            return
        if first.split_tensors_count and tensors != first.split_tensors_count:
            result.invalid[eid] = (base, f"split model: parts hold {tensors} tensors, "
                                         f"split.tensors.count says {first.split_tensors_count}")
            return
        params = first.parameter_count if first.parameter_count_declared else sum(h.tensor_elements for h in headers)
        result.models[eid] = _info(base, first, tensors, params, headers)


def _ordered(parts: Mapping[int, _File]) -> list[_File]:
    return [parts[i] for i in sorted(parts)]


def _same(k: ModelInfo, path: str, fs: Sequence[_File]) -> bool:
    """Whether ``k`` was recorded from these very files (path, parts, total size, latest mtime)."""
    return (k.path == path and k.files == [f.path for f in fs]
            and k.size_bytes == sum(f.size for f in fs) and k.mtime_ns == max(f.mtime_ns for f in fs))


def _unchanged(k: ModelInfo, path: str, fs: Sequence[_File]) -> bool:
    # Invalid entries carry no tensors: never trust one of those, re-read the header instead.
    return k.tensor_count > 0 and _same(k, path, fs)


def _info(base: ModelInfo, h: gguf.GGUFHeader, tensors: int, params: int,
          parts: Sequence[gguf.GGUFHeader] = ()) -> ModelInfo:
    parts = parts or [h]
    # A split model's parts each hold some tensors: sum their bytes layer by layer.
    layers = [0] * max(len(p.layer_bytes) for p in parts)
    for p in parts:
        for i, b in enumerate(p.layer_bytes):
            layers[i] += b
    return ModelInfo(
        path=base.path, files=base.files, size_bytes=base.size_bytes, mtime_ns=base.mtime_ns,
        architecture=h.architecture, name=h.name, size_label=h.size_label, parameter_count=params,
        file_type=h.file_type, context_length=h.context_length, chat_template=h.chat_template,
        tensor_count=tensors, block_count=h.block_count, embedding_length=h.embedding_length,
        head_count=h.head_count, head_count_kv=h.head_count_kv,
        key_length=_int(h.metadata.get(f"{h.architecture}.attention.key_length")),
        value_length=_int(h.metadata.get(f"{h.architecture}.attention.value_length")),
        layer_bytes=layers, other_bytes=sum(p.other_bytes for p in parts),
        n_vocab=max(p.n_vocab for p in parts), output_bytes=max(p.output_bytes for p in parts),
        output_tied=all(p.output_tied for p in parts),
        pooling=h.pooling,
    )


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _utf8(name: str) -> bool:
    """Whether a name from the file system is UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: str) -> str:
    """A path with its bytes that are not UTF-8 written as \\xNN, for messages."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
