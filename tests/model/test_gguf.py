"""The header-only GGUF reader on the real models (SmolLM2, Gemma 3), checked against the gguf package."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimanode.executors.gguf import read_header
from unit.test_gguf import agrees_with_gguf_package


def test_smollm2_header(smollm2_path: Path) -> None:
    """SmolLM2-135M-Instruct reads as a llama Q4_1 model with an 8k context and a chat template."""
    h = read_header(smollm2_path)
    assert (h.architecture, h.file_type, h.context_length, h.chat_template) == ("llama", "Q4_1", 8192, True)
    assert (h.block_count, h.embedding_length, h.head_count, h.head_count_kv) == (30, 576, 9, 3)
    assert h.size_label == "135M" and h.version == 3
    assert h.data_end <= h.file_size == smollm2_path.stat().st_size


def test_smollm2_counts(smollm2_path: Path) -> None:
    """Tensor and parameter counts are those gguf.GGUFReader reports (checked live by the slow test below)."""
    h = read_header(smollm2_path)
    assert not h.parameter_count_declared  # the file has no general.parameter_count: summed from tensors
    assert (h.tensor_count, h.parameter_count) == (272, 134_515_008)
    assert h.data_end == h.file_size  # the last tensor ends the file


@pytest.mark.slow
def test_smollm2_counts_match_gguf_package(smollm2_path: Path) -> None:
    """Tensor count, element count and data layout equal gguf.GGUFReader's (10 s: it decodes the vocabulary)."""
    agrees_with_gguf_package(smollm2_path)


def gemma3_path() -> Path:
    """Fetched on first use (tools/fetch-models, cached): a missing model is a failure, never a skip."""
    from conftest import fetch_model

    return fetch_model("gemma3")


def test_gemma3_header() -> None:
    """Gemma 3 270M Q4_K_M (mixed quant types, no chat template in this file) reads with its own arch keys."""
    h = read_header(gemma3_path())
    assert (h.architecture, h.file_type, h.context_length, h.chat_template) == ("gemma3", "Q4_K_M", 32768, False)
    assert (h.block_count, h.embedding_length, h.head_count, h.head_count_kv) == (18, 640, 4, 1)
    assert (h.tensor_count, h.parameter_count, h.data_end) == (236, 268_098_176, h.file_size)


@pytest.mark.slow
def test_gemma3_counts_match_gguf_package() -> None:
    """Gemma 3's tensor layout equals gguf.GGUFReader's (slow: a 262k-token vocabulary)."""
    agrees_with_gguf_package(gemma3_path())
