"""Tool calls: which format a chat template speaks, the reply's calls parsed as they stream, and the
grammar that makes a required call parse.

How it works. ``detect`` names the template's *family* from its text: ``<tool_call>`` is Hermes /
Qwen (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the reply),
``[TOOL_CALLS]`` is Mistral (``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``),
``<|python_tag|>`` or the ``ipython`` role is Llama 3 (a reply that *starts* with
``{"name": ..., "parameters": {...}}``, several joined by ``;``, or JSON after ``<|python_tag|>``).
A template with none of them cannot be sent tools (``check`` says so, as it says what else a
request may not combine). The chat template renders the tools itself: ``template_tools`` and
``template_messages`` give it what transformers' ``apply_chat_template`` gives it (OpenAI-shaped
tools, assistant ``tool_calls`` whose ``arguments`` is a mapping that prints as JSON, ``tool``
turns with ``tool_call_id``).

``CallParser`` is fed the reply's text as it is decoded (by ``CallStream``, a ``TextStream`` that
hands it its chunks) and splits it into content and calls: text that may be the start of a call
marker is held back until it cannot be, so a stream never shows half a ``<tool_call>``; a call's
markup is never content; each call is emitted, with the tokens that carried it, as soon as its
closing marker (or its JSON's closing bracket) arrives. Whitespace right after a call, and at the
end of a reply that made calls, is dropped (the template put it there, not the model's answer). A call whose body is not a JSON object with a string ``name`` is
*malformed*: its text, markers included, goes out as content, as OpenAI-compatible servers (vLLM,
llama-server) return it; a call ends at the next call's marker whether it is whole or not, so a
broken one never swallows the calls after it. Arguments are re-serialized as compact JSON; ids are the model's where it
gives one, else ``call_`` + 24 hex digits (Mistral's templates require 9 alphanumerics: those).

``grammar`` is the GBNF for ``tool_choice`` ``required`` or a named function: a JSON Schema of one
call object (the name as a ``const``, the arguments as the tool's ``parameters``; one ``anyOf``
branch per tool) converted by llama-cpp-python's own converter (``llama_cpp.llama_grammar.SchemaConverter``, as
response_format's schemas are; the engine hands it in, so this module imports no llama_cpp), wrapped in the family's markup. Exactly one call, as llama-server
does without ``parallel_tool_calls``: a constrained reply always parses.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optimanode import protocol as p
from optimanode.worker.text import TextStream


@dataclass(frozen=True)
class Family:
    """A tool-call format."""

    name: str
    # Markers that open a call anywhere in the reply.
    starts: tuple[str, ...]
    # The marker that closes a Hermes call; "": the call is JSON, closed by its last bracket.
    end: str
    # A reply that starts with "{" is a call (Llama 3's format for the user's own functions).
    bare_json: bool
    # What the family names the arguments object (both names are accepted when parsing).
    args_key: str
    # The GBNF root of a constrained reply, around the rule of one call object.
    root: str

    @property
    def markers(self) -> tuple[str, ...]:
        """Texts that may be single special tokens: the worker renders those, so the parser sees them."""
        return self.starts + ((self.end,) if self.end else ())


HERMES = Family("hermes", ("<tool_call>",), "</tool_call>", False, "arguments",
                r'"<tool_call>\n" {call} "\n</tool_call>"')
LLAMA3 = Family("llama3", ("<|python_tag|>",), "", True, "parameters", "{call}")
MISTRAL = Family("mistral", ("[TOOL_CALLS]",), "", False, "arguments", r'"[TOOL_CALLS][" {call} "]"')
FAMILIES = {f.name: f for f in (HERMES, LLAMA3, MISTRAL)}
KNOWN = "Hermes/Qwen <tool_call>, Llama 3 <|python_tag|>/ipython, Mistral [TOOL_CALLS]"


def detect(template: str) -> Family | None:
    """The tool-call family a Jinja chat template speaks, from its text; None: none this node knows."""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return None


def check(request: p.ChatRequest, family: Family | None, template: str) -> tuple[Family | None, bool]:
    """(the family to parse the reply with, or None: not parsed; whether decoding is constrained).

    Raises ValueError with what a Gateway must change; ``template`` names the template in force
    for that message. Checked before the request takes a slot.
    """
    choice = request.tool_choice
    names = [t.name for t in request.tools]
    named = choice.name if isinstance(choice, p.NamedToolChoice) else None
    if not request.tools:
        if choice == "required" or named is not None:
            what = "required" if named is None else f"{{name: {named!r}}}"
            raise ValueError(f"tool_choice {what} needs tools; the request has none")
        if family is None and any(m.tool_calls for m in request.messages):
            raise ValueError(f"messages carry tool_calls, but {template} has no tool-call format this node "
                             f"knows ({KNOWN})")
        return None, False
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"tools: the function {name!r} is defined twice")
        seen.add(name)
    if family is None:
        raise ValueError(f"tools: {template} has no tool-call format this node knows ({KNOWN}); send the "
                         f"request without tools, or configure a chat_template that renders them")
    if named is not None and named not in seen:
        raise ValueError(f"tool_choice names {named!r}, which is not among the tools ({', '.join(names)})")
    if choice == "none":
        return None, False
    if request.params.response_format is not None:
        raise ValueError("response_format cannot be combined with tools (unless tool_choice is \"none\"): "
                         "both decide the shape of the reply")
    return family, choice != "auto"


# -- what the chat template is given -----------------------------------------------------------


class _Arguments(dict):  # type: ignore[type-arg]
    """A call's arguments for a template: a mapping (``| tojson`` writes the object, as
    transformers' templates expect) that prints as compact JSON (``{{ arguments }}``)."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False, separators=(",", ":"))


def _template_arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return _Arguments(value) if isinstance(value, dict) else text


def template_messages(messages: list[p.ChatMessage]) -> list[dict[str, Any]]:
    """The chat as OpenAI / transformers shape it for a Jinja template."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": _template_arguments(c.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def template_tools(tools: list[p.Tool]) -> list[dict[str, Any]]:
    """The tools as OpenAI shapes them (what templates iterate over)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters or {"type": "object", "properties": {}}}}
            for t in tools]


# -- the grammar of a constrained call ---------------------------------------------------------


def call_schema(family: Family, tools: list[p.Tool], choice: p.ToolChoice) -> dict[str, Any]:
    """The JSON Schema of the one call object a constrained reply holds."""
    chosen = [t for t in tools if not isinstance(choice, p.NamedToolChoice) or t.name == choice.name]
    # Local references ("#/$defs/X", what pydantic writes) point at the parameters' root: their
    # definitions move up to the call schema's root, where the converter resolves them.
    hoisted: dict[str, dict[str, Any]] = {}
    branches = []
    for t in chosen:
        params = dict(t.parameters) or {"type": "object"}
        for key in ("$defs", "definitions"):
            for name, value in (params.pop(key, None) or {}).items():
                if hoisted.setdefault(key, {}).setdefault(name, value) != value:
                    raise ValueError(f"tools: two functions define {key}/{name} differently; "
                                     f"a required call's grammar needs one definition")
        branches.append({"type": "object", "properties": {"name": {"const": t.name}, family.args_key: params},
                         "required": ["name", family.args_key], "additionalProperties": False})
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {**schema, **hoisted}


def grammar(family: Family, tools: list[p.Tool], choice: p.ToolChoice, schema_converter: Any) -> str:
    """GBNF for ``required`` or a named function. ``schema_converter``: the class
    ``llama_cpp.llama_grammar.SchemaConverter`` (the engine passes it: this module stays free of
    llama_cpp). Raises ValueError when a tool's parameters do not convert (the converter's words)."""
    converter = schema_converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(call_schema(family, tools, choice), "tools")
        rule = converter.visit(schema, "call")
    except Exception as exc:  # KeyError, ValueError, ... from an unsupported schema
        raise ValueError(f"tools: parameters do not convert to a grammar: {type(exc).__name__}: {exc}") from None
    # The converter names nothing "root" when the top rule has a name of its own.
    return converter.format_grammar() + "\nroot ::= " + family.root.format(call=rule) + "\n"


# -- parsing the reply -------------------------------------------------------------------------


def new_id(family: Family) -> str:
    if family is MISTRAL:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + secrets.token_hex(12)


# emit(content text, tokens it covers, calls completed with it)
Emit = Callable[[str, int, list[p.ToolCall]], None]


class CallParser:
    """Splits a reply's text into content and tool calls as it arrives (see the module docstring)."""

    def __init__(self, family: Family, emit: Emit) -> None:
        self.family = family
        self._emit = emit
        self.calls: list[p.ToolCall] = []
        self._buf = ""  # text not yet released: content that may open a call, or a call's body
        self._opener: str | None = None  # None: in content; else the marker that opened the call ("" bare JSON)
        self._fresh = ""  # text added since the last scan (a JSON body is tried only when it holds a bracket)
        self._at_start = family.bare_json  # a bare JSON object may still open the reply (or follow a call)
        # The ";" (and spaces) before a bare call that follows another: given back if it is malformed.
        self._lead = ""
        # Whitespace at the end of the content so far, held: dropped if the reply ends after a call.
        self._ws = ""
        self._after_call = False
        self._out = ""
        self._new: list[p.ToolCall] = []
        self._tokens = 0

    def feed(self, text: str, tokens: int) -> None:
        self._tokens += tokens
        self._buf += text
        self._fresh += text
        self._scan(final=False)
        self._release(final=False)

    def finish(self) -> None:
        self._scan(final=True)
        if not self.calls:
            self._out += self._ws
        self._ws = ""
        self._release(final=True)

    # -- internals

    def _release(self, final: bool) -> None:
        if self._out or self._new or (final and self._tokens):
            self._emit(self._out, self._tokens, self._new)
            self._out, self._new, self._tokens = "", [], 0

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._ws + text
        kept = text.rstrip()
        self._ws = text[len(kept):]
        self._out += kept

    def _scan(self, final: bool) -> None:
        while True:
            if self._opener is None:
                if not self._scan_content(final):
                    return
            elif not self._scan_call(final):
                return

    def _scan_content(self, final: bool) -> bool:
        """Release content up to the next call; True when a call was opened (scan on)."""
        buf = self._buf
        if self._at_start:
            rest = buf.lstrip()
            if self.calls:  # Llama 3 joins calls with ";"
                rest = rest.lstrip(";").lstrip()
            if not rest and not final:
                return False  # only whitespace yet: hold it
            if rest.startswith("{"):
                # The first body keeps its leading whitespace, for a malformed one (then content).
                self._buf = rest if self.calls else buf
                self._lead = buf[:len(buf) - len(rest)] if self.calls else ""
                self._opener, self._fresh = "", self._buf
                return True
            self._at_start = False
        at, marker = -1, ""
        for m in self.family.starts:
            i = buf.find(m)
            if i >= 0 and (at < 0 or i < at):
                at, marker = i, m
        if at >= 0:
            self._content(buf[:at])
            self._opener, self._buf, self._fresh = marker, buf[at + len(marker):], buf[at + len(marker):]
            return True
        keep = 0 if final else _partial(buf, self.family.starts)
        self._content(buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _scan_call(self, final: bool) -> bool:
        """Close the open call if its end has arrived; True when it was closed (scan on)."""
        assert self._opener is not None
        buf, family = self._buf, self.family
        # A JSON body's markers count only outside its strings: an argument may well say
        # "wrap it in </tool_call> tags" (and a constrained call must still parse).
        find = _outside_json_strings if buf.lstrip().startswith(("{", "[")) else str.find
        # A marker inside the body opens the next call: this one ends before it, whole or not.
        nxt = [i for i in (find(buf, m) for m in family.starts) if i >= 0]
        if nxt:
            buf, final = buf[:min(nxt)], True
        if family.end:
            j = find(buf, family.end)
            if j >= 0:
                end, calls = j + len(family.end), self._calls(buf[:j])
            elif final:  # never closed: a complete object still counts (models drop the end tag)
                end, calls = len(buf), self._calls(buf)
            else:
                return False
        else:
            if not final and "}" not in self._fresh and "]" not in self._fresh:
                return False
            self._fresh = ""
            body = buf.lstrip()
            try:
                value, n = json.JSONDecoder().raw_decode(body)
            except ValueError:
                if not final:
                    return False
                end, calls = len(buf), None
            else:
                end = len(buf) - len(body) + n
                items = value if isinstance(value, list) else [value]
                calls = self._calls_of(items, strict=self._opener == "")
        raw = self._opener + buf[:end]
        rest = self._buf[end:]
        self._buf, self._opener, self._fresh = rest, None, rest
        lead, self._lead = self._lead, ""
        if calls is None:
            self._content(lead + raw)  # malformed: the model's text, as it wrote it
            self._at_start = False
        else:
            self.calls.extend(calls)
            self._new.extend(calls)
            self._after_call = True
            self._at_start = family.bare_json
        return True

    def _calls(self, body: str) -> list[p.ToolCall] | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return self._calls_of([value], strict=False)

    def _calls_of(self, items: list[Any], strict: bool) -> list[p.ToolCall] | None:
        """The calls of parsed JSON objects, or None if one is not a call. ``strict`` (a bare
        Llama 3 object): it must name its arguments too, or it is only JSON the model wrote."""
        calls: list[p.ToolCall] = []
        for item in items:
            if not isinstance(item, dict):
                return None
            name = item.get("name")
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                return None
            if strict and "parameters" not in item and "arguments" not in item:
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):  # some models write the object as a JSON string
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if not isinstance(args, dict):
                return None
            given = item.get("id")
            taken = {c.id for c in self.calls} | {c.id for c in calls}
            ok = isinstance(given, str) and 0 < len(given) <= 256 and given not in taken
            calls.append(p.ToolCall(id=given if ok else new_id(self.family), name=name,
                                    arguments=json.dumps(args, ensure_ascii=False, separators=(",", ":"))))
        return calls


def _outside_json_strings(text: str, marker: str) -> int:
    """The first index of ``marker`` in ``text`` that is not inside a JSON string, or -1.

    ``text`` is a JSON body as it streams in (whole or not): a string starts at a ``"`` outside
    one and ends at the next ``"`` not escaped by a backslash.
    """
    in_string = escaped = False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif text.startswith(marker, i):
            return i
    return -1


def _partial(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class CallStream(TextStream):
    """A TextStream whose chunks go through a CallParser: ``emit(text, tokens, calls)`` receives
    content and calls. ``parser.calls`` has every call once the stream is finished."""

    def __init__(self, stops: list[str], family: Family, emit: Emit) -> None:
        self.parser = CallParser(family, emit)
        super().__init__(stops, self.parser.feed)

    def finish(self) -> None:
        # Also reached from feed() when a stop string ends the reply.
        super().finish()
        self.parser.finish()
