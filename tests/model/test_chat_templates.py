"""Chat templates an operator sets (a llama.cpp built-in name or Jinja text), the fallback, and bad ones, on real models.

Gemma 3 270M's GGUF carries no tokenizer.chat_template: it chats only through a template the
operator names (``gemma``) or the documented fallback (``chatml``).
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from model.test_worker import Worker, spawn  # noqa: F401 - spawn is the fixture
from optimanode import protocol as p
from optimanode.constraints import CHAT_TEMPLATE_NAMES
from optimanode.executors import effective
from optimanode.worker.engine import FALLBACK_CHAT_TEMPLATE, _BuiltinChat, builtin_chat_templates

pytestmark = pytest.mark.timeout(600)

QUESTION = [p.ChatMessage(role="user", content="What is the capital of France?")]
# Gemma 3 270M is a base model, not an instruction-tuned one: asked cold it rambles (so does
# llama-cpp-python's own chat_format="gemma"). Two turns of example make a chat it answers.
FEW_SHOT = [p.ChatMessage(role="user", content="What is the capital of Italy?"),
            p.ChatMessage(role="assistant", content="Rome."),
            p.ChatMessage(role="user", content="What is the capital of Spain?"),
            p.ChatMessage(role="assistant", content="Madrid."), *QUESTION]
GREEDY = p.SamplingParams(max_tokens=16, temperature=0.0, stop=["\n"])
# What llama.cpp's gemma template makes of FEW_SHOT (Gemma's turn markers), before the BOS.
GEMMA_PROMPT = ("<start_of_turn>user\nWhat is the capital of Italy?<end_of_turn>\n<start_of_turn>model\nRome.<end_of_turn>\n"
                "<start_of_turn>user\nWhat is the capital of Spain?<end_of_turn>\n<start_of_turn>model\nMadrid.<end_of_turn>\n"
                "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n")


def _tokens(model: Path, text: str) -> list[int]:
    """``text`` tokenized by llama-cpp-python's own Llama (vocabulary only), BOS first, special tokens parsed."""
    llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    finally:
        llm.close()


def _chat(w: Worker, messages: list[p.ChatMessage], id: str = "c1") -> tuple[str, p.Done]:
    chunks, done = w.generate(p.ChatRequest(messages=messages, params=GREEDY), id=id)
    assert isinstance(done, p.Done), done
    return "".join(c.text for c in chunks), done


def test_the_documented_names_are_llama_cpps_own() -> None:
    """The node checks names against CHAT_TEMPLATE_NAMES (it may not import llama_cpp): the list must be this build's."""
    assert list(CHAT_TEMPLATE_NAMES) == builtin_chat_templates()
    assert FALLBACK_CHAT_TEMPLATE in CHAT_TEMPLATE_NAMES
    assert FALLBACK_CHAT_TEMPLATE == effective.FALLBACK_CHAT_TEMPLATE  # what ExecutorStatus names


def test_a_builtin_template_renders_gemmas_turn_markers() -> None:
    rendered = _BuiltinChat("gemma")([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi" * 3000}])  # past the first buffer
    assert rendered == f"<start_of_turn>user\nBe brief.\n\n{'Hi' * 3000}<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_chats_with_the_gemma_template(spawn, gemma3_path: Path) -> None:  # noqa: ANN001
    w = spawn()
    ready = w.start(gemma3_path, chat_template="gemma")
    assert ready.chat_template_in_force == "gemma"
    text, done = _chat(w, FEW_SHOT)
    assert text.startswith("Paris"), text
    # The prompt the worker decoded is exactly Gemma's turn markers around the turns, after the BOS.
    assert done.usage.prompt_tokens == len(_tokens(gemma3_path, GEMMA_PROMPT))
    # A system message: llama.cpp's gemma template folds it into the first user turn.
    text, done = _chat(w, [p.ChatMessage(role="system", content="Answer in one word."), *FEW_SHOT], id="c2")
    assert text.startswith("Paris"), text
    assert done.usage.prompt_tokens == len(_tokens(gemma3_path, GEMMA_PROMPT.replace(
        "user\nWhat is the capital of Italy", "user\nAnswer in one word.\n\nWhat is the capital of Italy", 1)))


def test_a_model_without_a_template_falls_back_to_chatml(spawn, gemma3_path: Path) -> None:  # noqa: ANN001
    w = spawn()
    ready = w.start(gemma3_path)
    assert (ready.chat_template, ready.chat_template_in_force) == (True, FALLBACK_CHAT_TEMPLATE)
    _, done = _chat(w, QUESTION)
    chatml = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert done.usage.prompt_tokens == len(_tokens(gemma3_path, chatml))


def test_jinja_text_is_a_custom_template(spawn, smollm2_path: Path) -> None:  # noqa: ANN001
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                "{% endfor %}<|im_start|>assistant\n")
    w = spawn()
    ready = w.start(smollm2_path, chat_template=template)
    assert ready.chat_template_in_force == "custom"
    _, done = _chat(w, QUESTION)
    # Jinja drops the template's final newline (keep_trailing_newline is off, as in transformers).
    rendered = "<|im_start|>user\nWHAT IS THE CAPITAL OF FRANCE?<|im_end|>\n<|im_start|>assistant"
    # SmolLM2 adds no BOS of its own: the count is the rendered text's.
    llm = llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)
    try:
        assert done.usage.prompt_tokens == len(llm.tokenize(rendered.encode(), add_bos=False, special=True))
    finally:
        llm.close()


def test_the_files_own_template_is_named_file(spawn, smollm2_path: Path) -> None:  # noqa: ANN001
    w = spawn()
    assert w.start(smollm2_path).chat_template_in_force == "file"


@pytest.mark.parametrize(("setting", "message"), [
    ("no-such-template", "chat_template 'no-such-template' is neither a template llama.cpp knows (bailing"),
    ("{% for m in messages %}{{ m.content }}", "chat_template does not compile: Unexpected end of template"),
])
def test_a_bad_template_fails_the_load_with_its_reason(spawn, smollm2_path: Path, setting: str,  # noqa: ANN001
                                                       message: str) -> None:
    """The worker checks the setting before loading the model: it exits with the load code and says why."""
    w = spawn()
    w.send(p.WorkerSettings(model_path=str(smollm2_path), n_ctx=512, n_threads=2, chat_template=setting))
    assert w.wait(timeout=60) == 3  # log.EXIT_LOAD
    assert any(message in line for line in w.stderr), w.stderr[-5:]
