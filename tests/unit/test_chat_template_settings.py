"""The chat_template setting: checked in the config file and on the link, merged into WorkerSettings, named in ExecutorStatus."""

from __future__ import annotations

import msgspec
import pytest

from optimanode import protocol as p
from optimanode.config import ModelDefaults, load_settings
from optimanode.constraints import CHAT_TEMPLATE_NAMES, explain
from optimanode.errors import ConfigError
from optimanode.executors.effective import FALLBACK_CHAT_TEMPLATE, chat_template_in_force, effective

JINJA = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _info(has_template: bool) -> p.ModelInfo:
    return p.ModelInfo(path="/m/a.gguf", files=["/m/a.gguf"], size_bytes=1, mtime_ns=1, chat_template=has_template)


def test_the_config_file_takes_a_name_or_jinja_text(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[model_defaults]\nchat_template = "gemma"\n')
    assert load_settings(f, environ={}).model_defaults.chat_template == "gemma"
    f.write_text(f'[model_defaults]\nchat_template = """{JINJA}"""\n')
    assert load_settings(f, environ={}).model_defaults.chat_template == JINJA
    assert load_settings(environ={}).model_defaults.chat_template is None


def test_an_unknown_name_in_the_config_file_says_what_is_expected(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[model_defaults]\nchat_template = "gemma4"\n')
    with pytest.raises(ConfigError, match=r"model_defaults\.chat_template: expected the name of a template "
                                          r"llama\.cpp knows \(chatml, gemma, llama3"):
        load_settings(f, environ={})


def test_a_configure_with_an_unknown_name_does_not_decode_and_names_the_field():
    bad = msgspec.msgpack.encode({"type": "configure", "id": "c", "model": "m",
                                  "settings": {"chat_template": "no-such"}})
    with pytest.raises(msgspec.ValidationError) as info:
        p.decode_from_gateway(bad)
    path, expected = explain(info.value, p.GatewayToNode)
    assert path == "settings.chat_template" and expected.startswith("the name of a template llama.cpp knows")
    for good in ("chatml", JINJA, "{{ messages[0].content }}"):
        ok = msgspec.msgpack.encode({"type": "configure", "id": "c", "model": "m", "settings": {"chat_template": good}})
        assert p.decode_from_gateway(ok).settings.chat_template == good  # type: ignore[union-attr]


def test_a_model_setting_overrides_the_default_and_reaches_the_worker():
    defaults = ModelDefaults(chat_template="chatml")
    assert effective(_info(False), p.ModelSettings(), ModelDefaults(), "").chat_template == ""
    assert effective(_info(False), p.ModelSettings(), defaults, "").chat_template == "chatml"
    assert effective(_info(False), p.ModelSettings(chat_template="gemma"), defaults, "").chat_template == "gemma"


@pytest.mark.parametrize(("has_template", "setting", "in_force"), [
    (True, None, "file"),
    (False, None, FALLBACK_CHAT_TEMPLATE),
    (False, "gemma", "gemma"),
    (True, "llama3", "llama3"),
    (True, JINJA, "custom"),
])
def test_which_template_is_in_force(has_template: bool, setting: str | None, in_force: str) -> None:
    assert chat_template_in_force(_info(has_template), p.ModelSettings(chat_template=setting), ModelDefaults()) == in_force


def test_the_fallback_is_a_builtin_name():
    assert FALLBACK_CHAT_TEMPLATE == "chatml" and FALLBACK_CHAT_TEMPLATE in CHAT_TEMPLATE_NAMES
