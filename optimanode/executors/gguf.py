"""A header-only GGUF reader: what a model file says about itself, without touching its weights.

How it works: the file is read through a small window (the first 64 KiB in one read, which holds
the whole header of most files; bigger headers, dominated by the tokenizer arrays, are read on
in chunks). The parser walks magic, version (2 or 3), the tensor and metadata counts, the metadata
key/values and the tensor infos. Big arrays are never materialised: fixed-size element arrays are
skipped by arithmetic (the window seeks past them), string arrays by walking their length
prefixes with ``struct.unpack_from``. From the tensor infos and an embedded table of ggml types it
computes where the tensor data must end, so a truncated file is caught without reading the data.
On the way it sums each tensor's bytes by repeating layer (``blk.N.``) and the rest, and reads the
vocabulary size from the token embedding's shape: the memory estimate (``executors/memory.py``)
places weights per layer on the CPU or a GPU from them.

Every problem raises ``ModelFileError(path, reason)`` with a reason an operator can act on. Counts
and lengths in a corrupt header are checked against the file size (and a few hard caps) before
they drive a loop or an allocation, so a corrupt file costs at most a few reads.

Only the standard library is used: the registry reads thousands of headers per scan.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from optimanode.errors import ModelFileError
from optimanode.protocol import pooling_in_force

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
FIRST_READ = 64 * 1024
# Caps that no real model reaches (ggml has 4 dims; vocabularies and merge lists are < 2M
# entries): beyond them a header is corrupt, and the cap keeps a corrupt count from spinning.
MAX_DIMS = 8
MAX_ARRAY_WALK = 1 << 24
MAX_NESTED = 1 << 16
MAX_COUNT = 1 << 20
MAX_ARRAY_DEPTH = 4
# Layers (``{arch}.block_count``, the N of ``blk.N.``): llama.cpp loads at most 512 (LLAMA_MAX_LAYERS
# in its llama-hparams.h). Beyond the header's block_count (or this cap, where it has none) a
# tensor's layer is corrupt: ``layer_bytes`` has an entry per layer up to the highest.
MAX_LAYERS = 512
# Widths the memory estimate multiplies (executors/memory.py): past these a header is corrupt. Far
# above any real model (embeddings of ~30,000, 128 heads of 256, vocabularies of ~260,000), and low
# enough that the estimate's products stay inside the 64 bits it is sent in (one file's 2**62 once
# made every model list fail to encode).
MAX_WIDTH = 1 << 20  # embedding_length
MAX_HEADS = 1 << 14  # attention.head_count, head_count_kv
MAX_HEAD_WIDTH = 1 << 16  # attention.key_length, value_length
MAX_VOCAB = 1 << 24  # the token embedding's rows
# Longer string values are skipped, not decoded (a chat template is a few KiB).
MAX_DECODED_STRING = 1 << 20
# Small integer arrays (per-layer head counts) are decoded; bigger arrays are only skipped.
MAX_DECODED_ARRAY = 4096

# ggml type id → (name, elements per block, bytes per block); ggml.c type_traits.
# tests/unit/test_gguf.py checks it against gguf.GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# general.file_type (llama.cpp's enum llama_ftype) → the name people know the file by.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0",
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<4sIQQ")
# GGUF value types: fixed-size scalars by struct, 8 = string, 9 = array.
_SCALARS: dict[int, struct.Struct] = {
    t: struct.Struct("<" + c) for t, c in
    {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}.items()
}
_STRING, _ARRAY = 8, 9
_INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    path: str
    version: int
    file_size: int
    architecture: str
    name: str
    size_label: str
    # general.parameter_count when the file declares it, else the element count of its tensors.
    parameter_count: int
    parameter_count_declared: bool
    # Elements of the tensors in this file (one part of a split model holds only some).
    tensor_elements: int
    file_type: str
    context_length: int
    chat_template: bool
    tensor_count: int
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    # split.no is 0-based; split_count 0 means "not a split model".
    split_no: int
    split_count: int
    split_tensors_count: int
    alignment: int
    data_offset: int
    # Bytes the file must have: the end of the last tensor's data.
    data_end: int
    # Scalars and strings as read; small integer arrays as tuples; the rest as Skipped.
    metadata: dict[str, Any] = field(repr=False, compare=False)
    # Tensor bytes by repeating layer (index N of "blk.N.*"; missing indices hold 0), and the bytes
    # of the other tensors: token embedding, output head, norms.
    layer_bytes: tuple[int, ...] = ()
    other_bytes: int = 0
    # Rows of token_embd.weight (its second dimension): the vocabulary size, 0 when absent.
    n_vocab: int = 0
    # The output head's bytes: output.weight, or token_embd.weight where the two are tied
    # (llama.cpp then duplicates it onto the output's device).
    output_bytes: int = 0
    output_tied: bool = False
    # How an embed request pools: ``{arch}.pooling_type`` by name, or "mean" where the file
    # declares none (protocol.pooling_in_force).
    pooling: str = "mean"


@dataclass(frozen=True, slots=True)
class Skipped:
    """A metadata value the reader stepped over: a long string or a big array (never decoded)."""

    kind: str  # "string" or "array"
    count: int  # bytes of the string, elements of the array


class _Window:
    """Bytes of the file from ``base``; ``pos`` indexes ``buf``. Reads only on demand."""

    __slots__ = ("f", "path", "size", "buf", "base", "pos", "chunk")

    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.buf = f.read(FIRST_READ)
        self.base = self.pos = 0
        self.chunk = FIRST_READ

    def need(self, n: int) -> None:
        """Make buf[pos:pos+n] available, or fail if the file ends first."""
        if self.pos + n <= len(self.buf):
            return
        at = self.base + self.pos
        if at + n > self.size:
            raise ModelFileError(self.path, f"header runs past the end of the file ({self.size} bytes): "
                                            "truncated or corrupt")
        keep = self.buf[self.pos:] if self.pos < len(self.buf) else b""
        self.f.seek(at + len(keep))
        # Double the chunk per refill (up to 8 MiB): a big header costs few reads, none of them huge.
        self.chunk = min(self.chunk * 2, 8 << 20)
        more = self.f.read(max(n - len(keep), self.chunk))
        self.buf, self.base, self.pos = keep + more, at, 0
        if len(self.buf) < n:
            raise ModelFileError(self.path, "file shrank while its header was read")

    def skip(self, n: int) -> None:
        if self.base + self.pos + n > self.size:
            raise ModelFileError(self.path, f"header runs past the end of the file ({self.size} bytes): "
                                            "truncated or corrupt")
        self.pos += n

    def u32(self) -> int:
        self.need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, limit: int = MAX_DECODED_STRING) -> str | Skipped:
        """Decode a string, or step over it when it is longer than ``limit``."""
        n = self.u64()
        if n > limit:
            self.skip(n)
            return Skipped("string", n)
        self.need(n)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def name(self, what: str) -> str:
        s = self.string(65535)
        if isinstance(s, Skipped):
            raise ModelFileError(self.path, f"corrupt header: a {what} is {s.count} bytes long")
        return s

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        st = _SCALARS.get(vtype)
        if st is not None:
            self.need(st.size)
            (v,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            return v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(key, depth)
        raise ModelFileError(self.path, f"corrupt header: metadata {key!r} has unknown value type {vtype}")

    def array(self, key: str, depth: int) -> Any:
        etype, count = self.u32(), self.u64()
        st = _SCALARS.get(etype)
        if st is not None:
            if etype in _INTEGER_TYPES and count <= MAX_DECODED_ARRAY:
                self.need(st.size * count)
                v = struct.unpack_from(f"<{count}{st.format[-1]}", self.buf, self.pos)
                self.pos += st.size * count
                return v
            self.skip(st.size * count)
        elif etype == _STRING or etype == _ARRAY:
            # Each element takes at least 8 bytes; the caps bound the loop on zero-filled garbage.
            if count > (MAX_ARRAY_WALK if etype == _STRING else MAX_NESTED) or count * 8 > self.size:
                raise ModelFileError(self.path, f"corrupt header: metadata {key!r} claims {count} elements")
            if etype == _STRING:
                self._skip_strings(count)
            elif depth >= MAX_ARRAY_DEPTH:
                raise ModelFileError(self.path, f"corrupt header: metadata {key!r} nests arrays too deep")
            else:
                for _ in range(count):
                    self.array(key, depth + 1)
        else:
            raise ModelFileError(self.path, f"corrupt header: metadata {key!r} has unknown element type {etype}")
        return Skipped("array", count)

    def _skip_strings(self, count: int) -> None:
        # The hot loop of big headers (vocabularies): local names, one bounds check per element.
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        for _ in range(count):
            if pos + 8 > len(buf):
                self.pos = pos
                self.need(8)
                buf, pos = self.buf, self.pos
            pos += 8 + unpack(buf, pos)[0]
        self.pos = 0
        self.skip(pos)  # checks that the last string still ends inside the file


def file_type_name(code: int) -> str:
    return FILE_TYPES.get(code, f"type {code}")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the GGUF header of ``path``; raise ModelFileError when the file cannot be a usable model.

    OSError (missing, unreadable) propagates: the caller decides what a vanished file means.
    """
    spath = os.fspath(path)
    with open(spath, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        return _parse(_Window(f, spath, size), spath, size)


def _int(v: Any) -> int:
    if isinstance(v, tuple):  # per-layer values (e.g. head counts of OpenELM): the largest
        return max(v, default=0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _parse(w: _Window, path: str, size: int) -> GGUFHeader:
    if size < _HEAD.size:
        if len(w.buf) < 4 or w.buf[:4] != MAGIC:
            raise ModelFileError(path, f"not a GGUF file ({size} bytes, no GGUF magic)")
        raise ModelFileError(path, f"header runs past the end of the file ({size} bytes): truncated or corrupt")
    magic, version, n_tensors, n_kv = _HEAD.unpack_from(w.buf, 0)
    w.pos = _HEAD.size
    if magic != MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise ModelFileError(path, f"big-endian GGUF (version {swapped}) is not supported")
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    # A metadata entry takes at least 13 bytes and a tensor info 24: counts beyond that are lies.
    if n_kv > MAX_COUNT or n_kv * 13 > size:
        raise ModelFileError(path, f"corrupt header: claims {n_kv} metadata entries")
    if n_tensors > MAX_COUNT or n_tensors * 24 > size:
        raise ModelFileError(path, f"corrupt header: claims {n_tensors} tensors")

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = w.name("metadata key")
        vtype = w.u32()
        meta[key] = w.value(vtype, key)

    arch = meta.get("general.architecture")
    block_key = f"{arch if isinstance(arch, str) else ''}.block_count"
    block_count = _int(meta.get(block_key, 0))
    if block_count > MAX_LAYERS:
        raise ModelFileError(path, f"corrupt header: {block_key} is {block_count} "
                                   f"(llama.cpp loads at most {MAX_LAYERS} layers)")
    # A split part after the first has no block_count: its tensors' layers are held to the cap.
    layer_cap = block_count or MAX_LAYERS
    for suffix, cap in (("embedding_length", MAX_WIDTH), ("attention.head_count", MAX_HEADS),
                        ("attention.head_count_kv", MAX_HEADS), ("attention.key_length", MAX_HEAD_WIDTH),
                        ("attention.value_length", MAX_HEAD_WIDTH)):
        key = f"{arch if isinstance(arch, str) else ''}.{suffix}"
        if _int(meta.get(key, 0)) > cap:
            raise ModelFileError(path, f"corrupt header: {key} is {_int(meta[key])} (at most {cap})")

    elements = 0
    data_len = 0
    layers: dict[int, int] = {}
    other = 0
    n_vocab = 0
    head = {"output.weight": 0, "token_embd.weight": 0}
    for _ in range(n_tensors):
        name = w.name("tensor name")
        n_dims = w.u32()
        if n_dims > MAX_DIMS:
            raise ModelFileError(path, f"corrupt header: tensor {name!r} has {n_dims} dimensions")
        w.need(8 * n_dims + 12)
        dims = struct.unpack_from(f"<{n_dims}Q", w.buf, w.pos)
        gtype, offset = struct.unpack_from("<IQ", w.buf, w.pos + 8 * n_dims)
        w.pos += 8 * n_dims + 12
        ne = 1
        for d in dims:
            ne *= d
        t = GGML_TYPES.get(gtype)
        if t is None:
            raise ModelFileError(path, f"tensor {name!r} has ggml type {gtype}, unknown to this reader "
                                       "(removed from llama.cpp, or newer than this node)")
        elements += ne
        nbytes = -(-ne // t[1]) * t[2]
        data_len = max(data_len, offset + nbytes)
        layer = _layer_of(name)
        if layer is not None and layer >= layer_cap:
            bound = (f"{block_key} is {block_count}" if block_count else
                     f"the header declares no {block_key} and llama.cpp loads at most {MAX_LAYERS} layers")
            raise ModelFileError(path, f"corrupt header: tensor {name!r} is in layer {layer}, but {bound}")
        if layer is None:
            other += nbytes
        else:
            layers[layer] = layers.get(layer, 0) + nbytes
        if name in head:
            head[name] = nbytes
        if name == "token_embd.weight" and n_dims >= 2:
            n_vocab = dims[1]
            if n_vocab > MAX_VOCAB:
                raise ModelFileError(path, f"corrupt header: tensor {name!r} has {n_vocab} rows (a vocabulary of at "
                                           f"most {MAX_VOCAB})")

    alignment = _int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(path, f"corrupt header: general.alignment {alignment} is not a power of two")
    info_end = w.base + w.pos
    data_offset = -(-info_end // alignment) * alignment
    data_end = data_offset + data_len if n_tensors else info_end

    split_count = _int(meta.get("split.count", 0))
    if n_tensors == 0 and split_count <= 1:
        raise ModelFileError(path, "vocabulary-only GGUF: holds no weights")
    if size < data_end:
        raise ModelFileError(path, f"truncated: has {size} bytes, tensor data needs {data_end}")

    def text(key: str) -> str:
        v = meta.get(key, "")
        return v if isinstance(v, str) else ""

    arch = text("general.architecture")
    declared = "general.parameter_count" in meta and _int(meta["general.parameter_count"]) > 0
    head_count = _int(meta.get(f"{arch}.attention.head_count", 0))
    template = meta.get("tokenizer.chat_template")
    ftype = meta.get("general.file_type")
    return GGUFHeader(
        path=path, version=version, file_size=size, architecture=arch, name=text("general.name"),
        size_label=text("general.size_label"),
        parameter_count=_int(meta["general.parameter_count"]) if declared else elements,
        parameter_count_declared=declared, tensor_elements=elements,
        file_type=file_type_name(_int(ftype)) if ftype is not None else "",
        context_length=_int(meta.get(f"{arch}.context_length", 0)),
        chat_template=bool(template),
        tensor_count=n_tensors,
        block_count=block_count,
        embedding_length=_int(meta.get(f"{arch}.embedding_length", 0)),
        head_count=head_count,
        head_count_kv=_int(meta.get(f"{arch}.attention.head_count_kv", head_count)),
        split_no=_int(meta.get("split.no", 0)), split_count=split_count,
        split_tensors_count=_int(meta.get("split.tensors.count", 0)),
        alignment=alignment, data_offset=data_offset, data_end=data_end, metadata=meta,
        layer_bytes=tuple(layers.get(i, 0) for i in range(max(layers) + 1)) if layers else (),
        other_bytes=other, n_vocab=n_vocab, output_bytes=head["output.weight"] or head["token_embd.weight"],
        output_tied=head["output.weight"] == 0,
        pooling=pooling_in_force(meta.get(f"{arch}.pooling_type")),
    )


def _layer_of(name: str) -> int | None:
    """N for a tensor named "blk.N.<...>", else None."""
    if not name.startswith("blk."):
        return None
    index, dot, _ = name[4:].partition(".")
    return int(index) if dot and index.isascii() and index.isdigit() and len(index) < 7 else None
