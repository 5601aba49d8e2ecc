"""Helpers (not tests) that write the small, odd GGUF files the tests and tools/bench-scan need.

Valid files are written with the ``gguf`` package's GGUFWriter, so the reader under test is
checked against an independent writer; broken files are made by cutting or hand-packing bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from pathlib import Path

import gguf
import numpy as np

logging.getLogger("gguf").setLevel(logging.WARNING)  # GGUFWriter logs every file it writes

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
# Three tensors of a toy llama: 4*8 + 8 + 8*8 = 104 elements.
TENSORS: dict[str, tuple[int, ...]] = {"token_embd.weight": (4, 8), "output_norm.weight": (8,),
                                       "blk.0.attn_q.weight": (8, 8)}
TINY_PARAMS = 104


def _meta(w: gguf.GGUFWriter, name: str, context_length: int, chat_template: bool,
          file_type: int, parameter_count: int | None) -> None:
    w.add_name(name)
    w.add_size_label("104")
    w.add_context_length(context_length)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_file_type(file_type)
    if parameter_count is not None:
        w.add_uint64("general.parameter_count", parameter_count)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b"])
    if chat_template:
        w.add_chat_template(TEMPLATE)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_model(path: Path, *, name: str = "Tiny Llama", context_length: int = 2048, chat_template: bool = True,
                file_type: int = 0, parameter_count: int | None = None, alignment: int | None = None) -> Path:
    """A tiny valid llama-like model: three small F32 tensors and the usual metadata."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    _meta(w, name, context_length, chat_template, file_type, parameter_count)
    for i, (tname, shape) in enumerate(TENSORS.items()):
        w.add_tensor(tname, np.full(shape, i + 1, dtype=np.float32))
    _finish(w)
    return path


def write_vocab_only(path: Path) -> Path:
    """A tokenizer-only GGUF (as llama.cpp ships for its tokenizer tests): metadata, no tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    _meta(w, "Vocab", 2048, True, 0, None)
    _finish(w)
    return path


def write_split(directory: Path, stem: str = "x", parts: int = 3) -> list[Path]:
    """A model split by GGUFWriter into ``stem-0000N-of-0000M.gguf`` with its split.* keys."""
    shapes = {f"blk.{i}.weight": (4, 8) for i in range(parts)}
    w = gguf.GGUFWriter(str(directory / f"{stem}.gguf"), "llama", split_max_tensors=1)
    _meta(w, "Split", 4096, False, 0, None)
    for i, (tname, shape) in enumerate(shapes.items()):
        w.add_tensor(tname, np.full(shape, i, dtype=np.float32))
    _finish(w)
    return [directory / f"{stem}-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]


def truncate(src: Path, dst: Path, cut: int = 16) -> Path:
    """A copy of ``src`` with its last ``cut`` bytes gone (inside the last tensor's data)."""
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) - cut])
    return dst


def _kv_string(key: str, value_len: int, value: bytes = b"") -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, value_len) + value


def write_bad_magic(path: Path) -> Path:
    path.write_bytes(b"GGML" + bytes(60))
    return path


def write_version(path: Path, version: int) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, 0) + bytes(32))
    return path


def write_absurd_string(path: Path) -> Path:
    """A header whose one metadata string claims 2**60 bytes."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + _kv_string("general.name", 1 << 60, b"abc"))
    return path


def write_absurd_array(path: Path, count: int = 1 << 40) -> Path:
    """A header whose string array claims ``count`` elements, followed by zero bytes (length-0 strings)."""
    k = b"tokenizer.ggml.tokens"
    body = struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 8, count)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + body + bytes(4096))
    return path


def write_absurd_counts(path: Path) -> Path:
    """A header that claims 2**62 metadata entries."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1 << 62) + bytes(64))
    return path


def write_header_cut(src: Path, dst: Path, keep: int = 200) -> Path:
    """The first ``keep`` bytes of a valid file: the header itself runs past the end."""
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def make_many(directory: Path, n: int, per_dir: int = 100, mtime: int = 1_700_000_000) -> list[Path]:
    """``n`` copies of one tiny model under ``directory/dNNN/mNNNNN.gguf``, all with an old mtime."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".one.gguf"
    data = write_model(tmp).read_bytes()
    tmp.unlink()
    out = []
    for i in range(n):
        sub = directory / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            sub.mkdir(exist_ok=True)
        p = sub / f"m{i:05d}.gguf"
        with open(p, "wb") as f:
            f.write(data)
        os.utime(p, (mtime, mtime))
        out.append(p)
    return out


def settle(*paths: Path, age_s: float = 3600.0) -> None:
    """Backdate mtimes so a fresh Registry sees the files as settled (not still being written)."""
    t = time.time() - age_s
    for p in paths:
        os.utime(p, (t, t))


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
