"""Shared fixtures: the real test models provided by tools/fetch-models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODEL_CACHE = Path(os.environ.get("OPTIMANODE_MODEL_CACHE", "~/.cache/optimanode/models")).expanduser()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB); skips with the command to run when it is not there."""
    path = MODEL_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing: run tools/fetch-models smollm2")
    return path
