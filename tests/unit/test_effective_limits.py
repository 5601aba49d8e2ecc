"""What a worker gets where a model's header declares a context length past what a setting may hold."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import msgspec
import numpy as np
import pytest

from optimanode import protocol as p
from optimanode.config import ModelDefaults
from optimanode.constraints import NCtx
from optimanode.executors.effective import N_CTX_MAX, effective
from optimanode.executors.gguf import read_header

logging.getLogger("gguf").setLevel(logging.WARNING)

HUGE = (1 << 64) - 1  # the most a GGUF u64 holds


def info(context_length: int) -> p.ModelInfo:
    return p.ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=1, mtime_ns=1,
                       context_length=context_length)


def encodes(ws: p.WorkerSettings) -> None:
    """The effective settings go out in every status and model list (msgpack to a Gateway, JSON to the API)."""
    status = p.ExecutorStatus(id="m", state="running", enabled=True, info=info(HUGE), effective=ws)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(status), type=p.ExecutorStatus).effective == ws
    msgspec.json.encode(status)


def test_n_ctx_max_is_the_settings_own_limit() -> None:
    """The cap is NCtx's maximum, not a second constant: a setting of N_CTX_MAX decodes, one more does not."""
    assert N_CTX_MAX == 1 << 20
    assert msgspec.convert(N_CTX_MAX, NCtx) == N_CTX_MAX
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(N_CTX_MAX + 1, NCtx)


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_huge_own_context_length_is_clamped_to_the_most_n_ctx_may_be(parallel: int) -> None:
    """n_ctx 0 with a header context_length of 2**64-1: the worker gets N_CTX_MAX, and it encodes."""
    ws = effective(info(HUGE), p.ModelSettings(parallel=parallel), ModelDefaults(n_ctx=0), "")
    assert ws.n_ctx == N_CTX_MAX
    encodes(ws)


def test_auto_slots_each_get_the_clamped_window() -> None:
    """parallel "auto" gives each slot the whole (clamped) window: slots × N_CTX_MAX, still encodable."""
    ws = effective(info(HUGE), p.ModelSettings(), ModelDefaults(n_ctx=0), "", auto_parallel=4)
    assert (ws.parallel, ws.n_ctx) == (4, 4 * N_CTX_MAX)
    encodes(ws)


@pytest.mark.parametrize(("own", "expected"), [(8192, 8192), (N_CTX_MAX, N_CTX_MAX), (N_CTX_MAX + 1, N_CTX_MAX),
                                               (0, 2048), (-5, 2048)])
def test_own_context_lengths_within_the_limit_are_kept(own: int, expected: int) -> None:
    """Only a length past the limit changes; none (0), or a nonsense negative, is 2048 as before."""
    assert effective(info(own), p.ModelSettings(parallel=1), ModelDefaults(n_ctx=0), "").n_ctx == expected


def test_a_set_n_ctx_ignores_the_header() -> None:
    assert effective(info(HUGE), p.ModelSettings(n_ctx=4096, parallel=1), ModelDefaults(n_ctx=0), "").n_ctx == 4096


def test_from_a_gguf_header(tmp_path: Path) -> None:
    """A GGUF whose llama.context_length is the u64 2**64-1 reads as such, and its worker gets N_CTX_MAX."""
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint64("llama.context_length", HUGE)
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.ones((8,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(path)
    assert h.context_length == HUGE
    ws = effective(info(h.context_length), p.ModelSettings(parallel=1), ModelDefaults(n_ctx=0), "")
    assert ws.n_ctx == N_CTX_MAX
    encodes(ws)
