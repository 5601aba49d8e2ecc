"""The header-only GGUF reader on small written files: tables, odd files, corrupt headers (real models: tests/model)."""

from __future__ import annotations

import os
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

import gguf_files as g
from optimanode.errors import ModelFileError
from optimanode.executors.gguf import (FILE_TYPES, GGML_TYPES, MAX_DECODED_STRING, MAX_LAYERS, Skipped,
                                      file_type_name, read_header)

MODEL_CACHE = Path(os.environ.get("OPTIMANODE_MODEL_CACHE", "~/.cache/optimanode/models")).expanduser()


def reason(path: Path) -> str:
    with pytest.raises(ModelFileError) as exc:
        read_header(path)
    assert exc.value.path == str(path)
    return exc.value.reason


def agrees_with_gguf_package(path: Path) -> None:
    h = read_header(path)
    r = gguf.GGUFReader(str(path))
    assert h.tensor_count == len(r.tensors)
    assert h.tensor_elements == sum(int(t.n_elements) for t in r.tensors)
    assert h.data_offset == r.data_offset
    assert h.data_end == max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
    assert h.architecture == r.fields["general.architecture"].contents()


# -- tables --------------------------------------------------------------------------------------


def test_ggml_type_table_matches_gguf_package() -> None:
    """Every ggml type's block size and byte size equal gguf.GGML_QUANT_SIZES, and no type is missing."""
    expected = {int(t): (t.name, *sizes) for t, sizes in gguf.GGML_QUANT_SIZES.items()}
    assert GGML_TYPES == expected


def test_file_type_names_match_llama_ftype() -> None:
    """general.file_type names follow llama.cpp's llama_ftype (MOSTLY_Q4_K_M → Q4_K_M)."""
    for ft in gguf.LlamaFileType:
        if ft is not gguf.LlamaFileType.GUESSED:
            assert FILE_TYPES[int(ft)] == ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    assert file_type_name(15) == "Q4_K_M" and file_type_name(999) == "type 999"


# -- small valid files ---------------------------------------------------------------------------


def test_tiny_model_fields(tmp_path: Path) -> None:
    """Every field of a tiny model written by GGUFWriter is read back."""
    p = g.write_model(tmp_path / "m.gguf", name="Tiny", context_length=4096, file_type=1)
    h = read_header(p)
    assert (h.architecture, h.name, h.size_label, h.file_type) == ("llama", "Tiny", "104", "F16")
    assert (h.context_length, h.block_count, h.embedding_length, h.head_count, h.head_count_kv) == (4096, 1, 8, 2, 1)
    assert (h.tensor_count, h.parameter_count, h.chat_template) == (3, g.TINY_PARAMS, True)
    assert (h.split_no, h.split_count) == (0, 0)
    assert h.data_end == p.stat().st_size
    agrees_with_gguf_package(p)


def test_declared_parameter_count_wins(tmp_path: Path) -> None:
    """general.parameter_count, when present, is reported instead of the tensor element count."""
    h = read_header(g.write_model(tmp_path / "m.gguf", parameter_count=135_000_000))
    assert (h.parameter_count, h.parameter_count_declared, h.tensor_elements) == (135_000_000, True, g.TINY_PARAMS)


def test_no_chat_template(tmp_path: Path) -> None:
    assert read_header(g.write_model(tmp_path / "m.gguf", chat_template=False)).chat_template is False


def test_head_count_kv_defaults_to_head_count(tmp_path: Path) -> None:
    """Without <arch>.attention.head_count_kv the model is multi-head: kv heads = heads."""
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_head_count(6)
    w.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    g._finish(w)
    h = read_header(tmp_path / "m.gguf")
    assert (h.head_count, h.head_count_kv, h.file_type) == (6, 6, "")


def test_custom_alignment(tmp_path: Path) -> None:
    """general.alignment moves the data section; the reader follows it like GGUFReader."""
    p = g.write_model(tmp_path / "m.gguf", alignment=256)
    h = read_header(p)
    assert h.alignment == 256 and h.data_offset % 256 == 0
    agrees_with_gguf_package(p)


def test_version_2_is_read(tmp_path: Path) -> None:
    """GGUF v2 has the v3 layout (v3 only added big-endian files), so it reads the same."""
    p = g.write_model(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p.write_bytes(data)
    assert read_header(p).version == 2


def test_big_header_across_reads(tmp_path: Path) -> None:
    """A 20k-token vocabulary (~400 KiB, beyond the first 64 KiB read) is walked, and what follows it is read."""
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_token_list([f"token-{i}" for i in range(20_000)])
    w.add_token_scores([0.0] * 20_000)
    w.add_chat_template(g.TEMPLATE)
    w.add_context_length(777)
    w.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    g._finish(w)
    h = read_header(p)
    assert (h.context_length, h.chat_template, h.tensor_count) == (777, True, 1)
    assert h.metadata["tokenizer.ggml.tokens"] == Skipped("array", 20_000)
    agrees_with_gguf_package(p)


def test_long_string_is_skipped_not_decoded(tmp_path: Path) -> None:
    """A string value over MAX_DECODED_STRING is stepped over; its presence still counts."""
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_chat_template("x" * (MAX_DECODED_STRING + 1))
    w.add_tensor("w", np.zeros((4,), dtype=np.float32))
    g._finish(w)
    h = read_header(p)
    assert h.chat_template and h.metadata["tokenizer.chat_template"] == Skipped("string", MAX_DECODED_STRING + 1)


def test_split_part_keys(tmp_path: Path) -> None:
    """Each part of a split model reports split.no (0-based), split.count and split.tensors.count."""
    parts = g.write_split(tmp_path, parts=3)
    got = [(h.split_no, h.split_count, h.split_tensors_count, h.tensor_count) for h in map(read_header, parts)]
    assert got == [(0, 3, 3, 1), (1, 3, 3, 1), (2, 3, 3, 1)]


# -- unusable files ------------------------------------------------------------------------------


def test_bad_magic(tmp_path: Path) -> None:
    assert reason(g.write_bad_magic(tmp_path / "m.gguf")) == "not a GGUF file (magic b'GGML', expected b'GGUF')"


@pytest.mark.parametrize("content", [b"", b"GG", b"GGUF\x03\x00"])
def test_too_short_for_a_header(tmp_path: Path, content: bytes) -> None:
    """Files shorter than the fixed header fail cleanly, whether or not they start like a GGUF."""
    p = tmp_path / "m.gguf"
    p.write_bytes(content)
    r = reason(p)
    assert r.startswith("not a GGUF file") if content[:4] != b"GGUF" else r.startswith("header runs past the end")


def test_unsupported_version(tmp_path: Path) -> None:
    assert reason(g.write_version(tmp_path / "m.gguf", 1)) == "unsupported GGUF version 1 (supported: 2, 3)"


def test_big_endian_is_named(tmp_path: Path) -> None:
    """A big-endian file (version bytes swapped on this machine) is reported as such, not as version 50331648."""
    assert reason(g.write_version(tmp_path / "m.gguf", 0x03000000)) == "big-endian GGUF (version 3) is not supported"


def test_vocabulary_only(tmp_path: Path) -> None:
    assert reason(g.write_vocab_only(tmp_path / "v.gguf")) == "vocabulary-only GGUF: holds no weights"


def test_truncated_tensor_data(tmp_path: Path) -> None:
    """A file cut inside its tensor data names both sizes."""
    full = g.write_model(tmp_path / "m.gguf")
    size = full.stat().st_size
    cut = g.truncate(full, tmp_path / "t.gguf", cut=16)
    assert reason(cut) == f"truncated: has {size - 16} bytes, tensor data needs {size}"


def test_header_runs_past_end(tmp_path: Path) -> None:
    """A file cut inside its header says so."""
    cut = g.write_header_cut(g.write_model(tmp_path / "m.gguf"), tmp_path / "h.gguf", keep=200)
    assert reason(cut).startswith("header runs past the end of the file (200 bytes)")


@pytest.mark.parametrize("writer", [g.write_absurd_string, g.write_absurd_array, g.write_absurd_counts,
                                    lambda p: g.write_absurd_array(p, count=1 << 23)])
def test_absurd_lengths_fail_fast_without_allocating(tmp_path: Path, writer) -> None:
    """Lengths and counts of 2**23..2**62 in a corrupt header neither allocate nor loop: < 1 MiB, one error."""
    p = writer(tmp_path / "m.gguf")
    tracemalloc.start()
    try:
        r = reason(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert r.startswith(("corrupt header", "header runs past the end"))


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_string_array_element_past_end(tmp_path: Path, bad: int) -> None:
    """A string array whose element ``bad`` claims 2**60 bytes stops at the end of the file, wherever it is."""
    k = b"tokenizer.ggml.tokens"
    items = b"".join(struct.pack("<Q", (1 << 60) if i == bad else 3) + b"abc" for i in range(3))
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", len(k)) + k
                  + struct.pack("<IIQ", 9, 8, 3) + items + bytes(64))
    assert reason(p).startswith("header runs past the end")


def test_unknown_tensor_type(tmp_path: Path) -> None:
    """A tensor of a ggml type the table lacks (removed Q4_0_4_4 = 31) cannot be sized: unusable."""
    p = g.write_model(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    h = read_header(p)
    # The last tensor info ends with its u32 type and u64 offset, just before the alignment padding.
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8
    assert struct.unpack_from("<I", data, at)[0] == 0 and h.tensor_count == 3
    struct.pack_into("<I", data, at, 31)
    p.write_bytes(data)
    assert reason(p).startswith("tensor 'blk.0.attn_q.weight' has ggml type 31, unknown to this reader")


def _one_layer_tensor(path: Path, tensor: str, block_count: int | None) -> Path:
    """A small GGUF (a few hundred bytes) holding one 1-element tensor ``tensor`` and, unless None, block_count."""
    w = gguf.GGUFWriter(str(path), "llama")
    if block_count is not None:
        w.add_block_count(block_count)
    w.add_tensor(tensor, np.ones((1,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tensor_past_block_count_is_corrupt(tmp_path: Path) -> None:
    """blk.999999 in a file whose block_count is 1 is a corrupt header, not a model with a 10**6-entry layer_bytes."""
    p = _one_layer_tensor(tmp_path / "m.gguf", "blk.999999.attn_q.weight", block_count=1)
    assert p.stat().st_size < 512
    assert reason(p) == ("corrupt header: tensor 'blk.999999.attn_q.weight' is in layer 999999, "
                         "but llama.block_count is 1")
    ok = read_header(_one_layer_tensor(tmp_path / "ok.gguf", "blk.0.attn_q.weight", block_count=1))
    assert (ok.block_count, ok.layer_bytes) == (1, (4,))


def test_tensor_layers_without_block_count_are_capped(tmp_path: Path) -> None:
    """Without a block_count (a split part after the first) a layer up to llama.cpp's 512 reads; past it is corrupt."""
    ok = read_header(_one_layer_tensor(tmp_path / "ok.gguf", f"blk.{MAX_LAYERS - 1}.w", block_count=None))
    assert (ok.block_count, len(ok.layer_bytes), ok.layer_bytes[-1]) == (0, MAX_LAYERS, 4)
    p = _one_layer_tensor(tmp_path / "m.gguf", "blk.999999.attn_q.weight", block_count=None)
    assert reason(p) == ("corrupt header: tensor 'blk.999999.attn_q.weight' is in layer 999999, but the header "
                         "declares no llama.block_count and llama.cpp loads at most 512 layers")


def test_absurd_block_count_is_corrupt(tmp_path: Path) -> None:
    """A block_count no llama.cpp loads is refused: the memory estimate spreads weights over that many layers."""
    p = _one_layer_tensor(tmp_path / "m.gguf", "blk.0.attn_q.weight", block_count=1_000_000)
    assert reason(p) == "corrupt header: llama.block_count is 1000000 (llama.cpp loads at most 512 layers)"


@pytest.mark.parametrize(("key", "cap"), [("llama.embedding_length", 1 << 20), ("llama.attention.head_count", 1 << 14),
                                        ("llama.attention.head_count_kv", 1 << 14),
                                        ("llama.attention.key_length", 1 << 16),
                                        ("llama.attention.value_length", 1 << 16)])
def test_a_width_past_any_real_model_is_corrupt(tmp_path: Path, key: str, cap: int) -> None:
    """The memory estimate multiplies these: one file's 2**62 once made every model list fail to encode."""
    def write(name: str, value: int) -> Path:
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_block_count(1)
        w.add_uint64(key, value)
        w.add_tensor("blk.0.attn_q.weight", np.ones((1,), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    assert reason(write("big.gguf", 2**62)) == f"corrupt header: {key} is {2**62} (at most {cap})"
    assert read_header(write("ok.gguf", cap)).block_count == 1


def test_a_vocabulary_past_any_real_model_is_corrupt(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.ones((1,), dtype=np.float32), raw_shape=(1 << 25, 0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert reason(tmp_path / "v.gguf") == ("corrupt header: tensor 'token_embd.weight' has 33554432 rows "
                                            "(a vocabulary of at most 16777216)")


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    """A missing file is not a ModelFileError: the caller decides what a vanished file means."""
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "nope.gguf")


def test_random_corruption_only_ever_raises_model_file_error(tmp_path: Path) -> None:
    """1,000 seeded byte flips, planted big u64s and cuts of a valid file: each reads or fails as ModelFileError."""
    import random

    src = g.write_model(tmp_path / "m.gguf").read_bytes()
    rng = random.Random(20240601)
    p = tmp_path / "f.gguf"
    outcomes = set()
    for _ in range(1000):
        data = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) - 8)
            if rng.random() < 0.5:
                data[at] = rng.randrange(256)
            else:
                data[at:at + 8] = struct.pack("<Q", rng.choice([1 << 60, (1 << 64) - 1, 1 << 32, 5000]))
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        p.write_bytes(data)
        try:
            read_header(p)
            outcomes.add("ok")
        except ModelFileError as exc:
            outcomes.add(exc.reason.split(" ")[0].rstrip(":"))
    assert {"ok", "header", "corrupt", "truncated"} <= outcomes
