"""Value types with their limits, shared by the settings and the protocol, and how a broken one is named.

How it works: every limit a peer or an operator can break is declared on the type, as a
``msgspec.Meta`` constraint whose ``description`` says, in an operator's words, what is expected
(``Port = Annotated[int, Meta(ge=1, le=65535, description="an integer from 1 to 65535")]``), or as
a ``Literal`` of the allowed strings. msgspec then checks it while decoding (a Gateway frame, a
worker frame, a settings file), so nothing re-checks ranges by hand. ``explain`` turns the one
``msgspec.ValidationError`` into what every edge reports: the dotted path of the value
(``request.params.top_p``, ``model_defaults.n_ctx``) and the expectation, read from the type at
that path (its description, or a Literal's choices). ``validated`` applies the same checks to a
Struct built in Python (msgspec checks constraints only when decoding), for the in-process API.

This module sits below both ``config`` and ``protocol``; it imports neither.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

import msgspec

# -- the shared value types -----------------------------------------------------------------------

# At most a year: finite (an infinite one passed the check once, and JSON writes it as null, which
# the journal then could not read back) and far past any timeout or interval an operator means.
SECONDS_MAX = 31_536_000
Seconds = Annotated[float, msgspec.Meta(gt=0, le=SECONDS_MAX, description="a number of seconds > 0, at most a year")]
SecondsOrZero = Annotated[float, msgspec.Meta(ge=0, le=SECONDS_MAX,
                                              description="a number of seconds >= 0, at most a year")]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535, description="an integer from 1 to 65535")]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1, description="a fraction from 0 to 1")]
NCtx = Annotated[int, msgspec.Meta(ge=0, le=1 << 20, description="0..1048576 (0: the model's own)")]
NThreads = Annotated[int, msgspec.Meta(ge=0, le=1024, description="0..1024 (0: all cores)")]
NGpuLayers = Annotated[int, msgspec.Meta(ge=-1, le=10_000, description="-1 (all) or a layer count")]
NBatch = Annotated[int, msgspec.Meta(ge=1, le=65536, description="1..65536")]
QueueSize = Annotated[int, msgspec.Meta(ge=0, le=100_000, description="0..100000")]
Parallel = Annotated[int, msgspec.Meta(ge=1, le=256, description="1..256")]
# How prompts that wait share decode steps (optimanode/worker, docs/configuration.md).
Prefill = Literal["auto", "one_per_step", "shortest_first", "together"]
# Safe mode (docs/operations.md): auto (after a fatal signal while loading), on, off.
SafeMode = Literal["auto", "on", "off"]
# No decode step this long while requests are pending: the worker is hung (docs/reliability.md,
# "A decode stalls"). At least 1 s: below that a slow but working prompt step would be killed.
StallTimeout = Annotated[float, msgspec.Meta(ge=1, le=86_400, description="a number of seconds from 1 to 86400")]
# A request's wall-time bound, counted from when the node took it (docs/reliability.md,
# "A request runs past its deadline"). A request's own is > 0; a model's may be 0, "none".
RequestDeadline = Annotated[float, msgspec.Meta(gt=0, le=86_400, description="a number of seconds > 0, "
                                                                            "at most 86400")]
ModelDeadline = Annotated[float, msgspec.Meta(ge=0, le=86_400, description="0 (no deadline) or a number of "
                                                                          "seconds up to 86400")]
# The chat templates llama.cpp has built in (``llama_chat_builtin_templates`` of the llama.cpp
# that llama-cpp-python 0.3.36 ships). Kept here because the node may not import llama_cpp: a
# Configure or a settings file naming another is refused at once, and the worker checks the name
# again against its own build. tests/model/test_chat_templates.py fails when the two lists differ.
CHAT_TEMPLATE_NAMES: tuple[str, ...] = (
    "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r", "deepseek",
    "deepseek-ocr", "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4", "falcon3", "gemma",
    "gigachat", "glmedge", "gpt-oss", "granite", "granite-4.0", "granite-4.1", "grok-2", "hunyuan-dense",
    "hunyuan-moe", "hunyuan-vl", "kimi-k2", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip",
    "llama3", "llama4", "megrez", "minicpm", "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7",
    "mistral-v7-tekken", "monarch", "openchat", "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world",
    "seed_oss", "smolvlm", "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr",
)
# A model's chat template (docs/configuration.md, "Chat templates"): one of those names, or Jinja
# text (anything with a "{{" or "{%" in it). The pattern is searched, so either branch may match.
ChatTemplate = Annotated[str, msgspec.Meta(
    min_length=1, max_length=131_072,
    pattern="^(?:" + "|".join(re.escape(n) for n in CHAT_TEMPLATE_NAMES) + r")$|\{[{%]",
    description="the name of a template llama.cpp knows (chatml, gemma, llama3, ... see "
                "docs/configuration.md) or Jinja text of at most 131072 characters")]
# Sampling that applications expect (docs/protocol.md, "SamplingParams"): OpenAI's ranges.
# frequency_penalty / presence_penalty: subtracted from a token's logit per earlier occurrence /
# once if it occurred (llama.cpp's penalties sampler).
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2, description="a number from -2 to 2")]
# logit_bias: token id -> a number added to its logit, at most LOGIT_BIAS_MAX entries. Ids above
# the model's vocabulary are refused by the worker, which alone knows it.
LOGIT_BIAS_MAX = 300
LogitBias = Annotated[
    dict[Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)], Annotated[float, msgspec.Meta(ge=-100, le=100)]],
    msgspec.Meta(max_length=LOGIT_BIAS_MAX,
                 description=f"a map of at most {LOGIT_BIAS_MAX} token ids (integers >= 0) to biases "
                             "from -100 to 100")]
# logprobs: how many alternatives to report per generated token, besides the chosen one.
LOGPROBS_MAX = 20
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=LOGPROBS_MAX, description=f"an integer from 0 to {LOGPROBS_MAX}")]
# GPU operator's settings (docs/configuration.md, "GPUs and memory"). The KV cache's element type
# (llama.cpp's type_k/type_v; a quantized V cache needs flash attention, so flash_attn "off" with
# q8_0/q4_0 is refused where both are known), flash attention, and placement: which GPUs
# ("auto": the ones with the most free memory), how layers are split across them (llama.cpp's
# split_mode), in what proportions (tensor_split, one share per GPU used) and which GPU holds
# the results and small tensors (main_gpu, an index into the model's GPUs).
KvCacheType = Literal["f16", "q8_0", "q4_0"]
FlashAttn = Literal["auto", "on", "off"]
SplitMode = Literal["none", "layer", "row"]
GPU_INDEX_MAX = 63
GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=GPU_INDEX_MAX, description=f"a GPU index from 0 to {GPU_INDEX_MAX}")]
Gpus = Literal["auto"] | Annotated[list[GpuIndex], msgspec.Meta(
    min_length=1, max_length=GPU_INDEX_MAX + 1,
    description="a list of GPU indices (0..63), e.g. [0, 1]")]
TensorSplit = Annotated[list[Annotated[float, msgspec.Meta(ge=0, le=1e6)]], msgspec.Meta(
    max_length=GPU_INDEX_MAX + 1,
    description="a list of at most 64 shares >= 0, one per GPU the model uses, e.g. [3, 1]")]
MainGpu = Annotated[int, msgspec.Meta(ge=0, le=GPU_INDEX_MAX,
                                      description="an index into the model's GPUs, 0 to 63")]
# "auto" (the default): as many slots as fit in memory, up to PARALLEL_AUTO_MAX (llama-server's
# automatic slot count), each with the full n_ctx window.
PARALLEL_AUTO_MAX = 4
ParallelSetting = Parallel | Literal["auto"]
# On-demand loading (docs/configuration.md, "On-demand models"): "always" keeps an enabled model
# loaded; "on_demand" loads it with the first request and unloads it after keep_alive_s idle (0:
# as soon as it is idle), or sooner when another model needs its memory (least recently used first).
EnableMode = Literal["always", "on_demand"]
KeepAlive = Annotated[float, msgspec.Meta(ge=0, le=31_536_000, description="0 or a number of seconds up to "
                                                                          "31536000 (a year)")]
# The worker's host-RAM prompt cache (docs/configuration.md, "Prompt cache"): MiB (0: off) or
# "auto" (an eighth of the RAM available once the model has loaded, at most 8192 MiB).
PromptCacheMib = Annotated[int, msgspec.Meta(ge=0, le=1 << 20, description="0 (off) to 1048576 MiB")] | Literal["auto"]
KV_CACHE_TYPES: tuple[str, ...] = typing.get_args(KvCacheType)
FLASH_ATTN_MODES: tuple[str, ...] = typing.get_args(FlashAttn)
SPLIT_MODES: tuple[str, ...] = typing.get_args(SplitMode)
PREFILL_POLICIES: tuple[str, ...] = typing.get_args(Prefill)
SAFE_MODES: tuple[str, ...] = typing.get_args(SafeMode)

# -- naming what was wrong ------------------------------------------------------------------------

# msgspec states the path only in its message ("... - at `$.request.params[0]`"): read here, once.
# A map's key is named "at `key` in `$.path`"; a map's value "at `$.path[...]`".
_AT_PATH = re.compile(r" - at `(?:key` in `)?\$\.?([^`]*)`$")
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")

T = TypeVar("T")


def explain(exc: msgspec.ValidationError, root: Any = None) -> tuple[str, str]:
    """(dotted path, what was expected) for a ValidationError raised decoding ``root``.

    The path is "" when msgspec names none (the value as a whole). The expectation is the
    ``description`` of the type at that path, or the choices of its Literal, when ``root`` is
    given and the path leads to one; otherwise msgspec's own words ("Expected `int`, got `str`").
    """
    text = str(exc)
    at = _AT_PATH.search(text)
    path = at.group(1) if at else ""
    message = text[: at.start()] if at else text
    named = _NAMED_FIELD.search(message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
        if "unknown field" in message:
            return path, "a known field"
    path = re.sub(r"\[(?:\d+|\.\.\.)\]", "", path)  # positions in a list, map values: the field is what is named
    expected = _expectation(root, path) if root is not None and not named else ""
    return path, expected or message.replace("Expected ", "")


def validated(obj: T) -> T:
    """``obj`` (a Struct built in Python) checked against its type's constraints; raises ValidationError."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(obj), type=type(obj))


def unwrap(tp: Any) -> Any:
    """The plain type under Annotated[...] and Optional[...] (``int | None`` → ``int``)."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def _expectation(root: Any, path: str) -> str:
    tp: Any = root
    for name in path.split(".") if path else []:
        tp = _field_type(tp, name)
        if tp is None:
            return ""
    return describe(tp)


def describe(tp: Any) -> str:
    """What a value of type ``tp`` must be, in words: its Meta description or Literal choices.

    A union of several (``1..256 or "auto"``) is described member by member."""
    for layer in _layers(tp):
        members = [a for a in typing.get_args(layer) if a is not type(None)]
        if typing.get_origin(layer) in (typing.Union, types.UnionType) and len(members) > 1:
            said = [", ".join(f'"{c}"' for c in typing.get_args(m)) if typing.get_origin(m) is Literal
                    else describe(m) for m in members]
            return " or ".join(w for w in said if w)
        if typing.get_origin(layer) is Annotated:
            for meta in typing.get_args(layer)[1:]:
                if isinstance(meta, msgspec.Meta) and meta.description:
                    return meta.description
        if typing.get_origin(layer) is Literal:
            return "one of " + ", ".join(str(a) for a in typing.get_args(layer))
    return ""


def _layers(tp: Any) -> list[Any]:
    out = [tp]
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        else:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1 or typing.get_origin(tp) is Literal:
                return out
            tp = args[0]
        out.append(tp)


def _field_type(tp: Any, name: str) -> Any:
    """The declared type of field ``name`` of the Struct under ``tp`` (or of a tagged union member)."""
    base = unwrap(tp)
    candidates = [a for a in typing.get_args(base)] if typing.get_origin(base) is not None else [base]
    for cand in candidates:
        cand = unwrap(cand)
        if isinstance(cand, type) and issubclass(cand, msgspec.Struct):
            hints = typing.get_type_hints(cand, include_extras=True)
            if name in hints:
                return hints[name]
        if typing.get_origin(cand) is list:
            found = _field_type(typing.get_args(cand)[0], name)
            if found is not None:
                return found
    return None
