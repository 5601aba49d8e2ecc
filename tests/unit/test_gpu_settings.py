"""The GPU operator's settings (KV cache type, flash attention, parallel auto, placement): accepted, refused with the field named, merged."""

from __future__ import annotations

import msgspec
import pytest

from optimanode import protocol as p
from optimanode.config import ModelDefaults, load_settings
from optimanode.constraints import explain
from optimanode.errors import ConfigError
from optimanode.executors.effective import effective, gpu_wish
from optimanode.executors.memory import GpuWish

INFO = p.ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=1, mtime_ns=1, context_length=8192)


def configure(settings: dict) -> p.GatewayToNode:
    return p.decode_from_gateway(msgspec.msgpack.encode({"type": "configure", "id": "c1", "model": "m",
                                                         "settings": settings}))


def refused(settings: dict) -> tuple[str, str]:
    with pytest.raises(msgspec.ValidationError) as info:
        configure(settings)
    return explain(info.value, p.GatewayToNode)


def test_good_values_pass_the_link() -> None:
    msg = configure({"kv_cache_type": "q8_0", "flash_attn": "on", "parallel": "auto", "gpus": [1, 0],
                     "split_mode": "row", "tensor_split": [3, 1], "main_gpu": 1})
    assert isinstance(msg, p.Configure)
    assert msg.settings == p.ModelSettings(kv_cache_type="q8_0", flash_attn="on", parallel="auto", gpus=[1, 0],
                                           split_mode="row", tensor_split=[3.0, 1.0], main_gpu=1)
    assert configure({"gpus": "auto", "parallel": 3}).settings == p.ModelSettings(gpus="auto", parallel=3)
    assert configure({"enable": "on_demand", "keep_alive_s": 0}).settings == p.ModelSettings(enable="on_demand",
                                                                                             keep_alive_s=0.0)


@pytest.mark.parametrize(("settings", "path", "expected"), [
    ({"kv_cache_type": "q5_1"}, "settings.kv_cache_type", "one of f16, q8_0, q4_0"),
    ({"flash_attn": True}, "settings.flash_attn", "one of auto, on, off"),
    ({"flash_attn": "yes"}, "settings.flash_attn", "one of auto, on, off"),
    ({"parallel": "many"}, "settings.parallel", '1..256 or "auto"'),
    ({"parallel": 0}, "settings.parallel", '1..256 or "auto"'),
    ({"gpus": "all"}, "settings.gpus", '"auto" or a list of GPU indices (0..63), e.g. [0, 1]'),
    ({"gpus": [64]}, "settings.gpus", '"auto" or a list of GPU indices (0..63), e.g. [0, 1]'),
    ({"gpus": []}, "settings.gpus", '"auto" or a list of GPU indices (0..63), e.g. [0, 1]'),
    ({"split_mode": "tensor"}, "settings.split_mode", "one of none, layer, row"),
    ({"tensor_split": [-1, 1]}, "settings.tensor_split", "a list of at most 64 shares >= 0, one per GPU the model "
                                                         "uses, e.g. [3, 1]"),
    ({"main_gpu": -1}, "settings.main_gpu", "an index into the model's GPUs, 0 to 63"),
    ({"enable": "sometimes"}, "settings.enable", "one of always, on_demand"),
    ({"keep_alive_s": -1}, "settings.keep_alive_s", "0 or a number of seconds up to 31536000 (a year)"),
])
def test_bad_values_are_refused_naming_the_field_and_what_is_expected(settings: dict, path: str,
                                                                      expected: str) -> None:
    assert refused(settings) == (path, expected)


def test_bad_values_in_the_settings_file_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model_defaults\.kv_cache_type: expected one of f16, q8_0, q4_0"):
        load_settings(environ={}, overrides={"model_defaults.kv_cache_type": "q2"})
    with pytest.raises(ConfigError, match=r'model_defaults\.parallel: expected 1\.\.256 or "auto"'):
        load_settings(environ={"OPTIMANODE_MODEL_DEFAULTS_PARALLEL": "0"})
    with pytest.raises(ConfigError, match=r"vram_reserve_mb"):
        load_settings(environ={}, overrides={"vram_reserve_mb": "-1"})
    s = load_settings(environ={"OPTIMANODE_MODEL_DEFAULTS_GPUS": "1,3", "OPTIMANODE_MODEL_DEFAULTS_FLASH_ATTN": "off"})
    assert (s.model_defaults.gpus, s.model_defaults.flash_attn, s.model_defaults.parallel) == ([1, 3], "off", "auto")


def test_a_models_own_settings_override_the_defaults_into_what_the_worker_gets() -> None:
    d = ModelDefaults(kv_cache_type="q8_0", flash_attn="on", split_mode="row", tensor_split=[1, 1], gpus=[0, 1])
    w = effective(INFO, p.ModelSettings(), d, "")
    assert (w.kv_cache_type, w.flash_attn, w.split_mode, w.tensor_split, w.main_gpu) == ("q8_0", "on", "row",
                                                                                         [1.0, 1.0], 0)
    w = effective(INFO, p.ModelSettings(kv_cache_type="q4_0", flash_attn="auto", split_mode="none", main_gpu=1), d, "")
    assert (w.kv_cache_type, w.flash_attn, w.split_mode, w.main_gpu) == ("q4_0", "auto", "none", 1)
    assert gpu_wish(p.ModelSettings(gpus="auto"), d) == GpuWish("auto", "row", (1.0, 1.0), 0)
    assert gpu_wish(p.ModelSettings(), d).gpus == (0, 1)
    # The defaults out of the box: auto slots (4 until admission says otherwise), f16, flash auto.
    w = effective(INFO, p.ModelSettings(n_ctx=1024), ModelDefaults(), "")
    assert (w.parallel, w.n_ctx, w.kv_cache_type, w.flash_attn) == (4, 4096, "f16", "auto")


def test_a_journal_written_before_these_settings_still_replays() -> None:
    old = b'{"enabled": true, "settings": {"n_ctx": 1024, "parallel": 2}, "by": "op"}'
    ev = msgspec.json.decode(old, type=p.DesiredChanged)
    assert ev.settings == p.ModelSettings(n_ctx=1024, parallel=2)
