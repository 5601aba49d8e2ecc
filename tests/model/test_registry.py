"""The models-directory scan on the real SmolLM2 file: it registers with its header fields."""

from __future__ import annotations

from pathlib import Path

from optimanode.executors.registry import Registry


def test_real_model_is_registered(tmp_path: Path, smollm2_path: Path) -> None:
    """SmolLM2 through a symlink in the models directory registers with its header fields."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / smollm2_path.name).symlink_to(smollm2_path)
    (info,) = Registry(tmp_path / "models", settle_s=0).scan().models.values()
    assert (info.architecture, info.file_type, info.context_length, info.tensor_count) == ("llama", "Q4_1", 8192, 272)
