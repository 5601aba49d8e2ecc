"""Embed requests: a second llama.cpp context on the worker's model, pooled, its inputs batched.

The engine hands every ``EmbedRequest`` to ``Embedder.add``, which tokenizes its inputs as
llama-cpp-python's ``Llama.embed`` does (the BOS the model asks for, special-token text read as
text) and refuses the request at once if an input has no tokens (``bad_request``), is longer than
the embedding context (``context_overflow``), or the request has more inputs than one reply frame
can carry (``bad_request``, ``embedplan.max_inputs``). Accepted requests queue here, apart from
the completion slots. Each serving-loop step then calls ``Embedder.step``: cancelled requests end
with ``Done(cancelled)``; ``embedplan.take`` packs the inputs of the waiting requests (one or
many, first come first served) into one batch, each input a sequence of its own, every token an
output (llama.cpp pools over the outputs); one ``llama_decode`` runs it, and
``llama_get_embeddings_seq`` reads one pooled vector per sequence, L2-normalized where the request
asked (``normalize``, default true). A request whose every input has a vector is answered with
``Done(stop, embeddings=...)``; its usage counts its inputs' tokens, completions 0.

The context is made on the first embed request (a completion-only worker pays nothing):
``embeddings`` on, the pooling in force (``protocol.pooling_in_force`` of the file's
``{arch}.pooling_type``: mean for a decoder-only model), one unified KV cache of
``n_ctx = n_batch = n_ubatch = min(n_batch, n_ctx)`` of the worker's settings (512 by default),
cleared before each decode, and up to 256 sequences. That size is the per-input limit: llama.cpp
pools per micro-batch, so an input must fit in one; it is what llama-server (``n_ubatch``) and
llama-cpp-python (``n_batch``) require too. The context shares the engine's threadpool (both are
driven by the one serving thread, never at once).
"""

from __future__ import annotations

import collections
import ctypes
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

import llama_cpp

from optimanode import protocol as p
from optimanode.worker.blackbox import _blackbox, _decode_hang
from optimanode.worker.embedplan import EmbedWork, max_inputs, take, unit
from optimanode.worker.jobs import _done, _Job
from optimanode.worker.log import TRACE, _log
from optimanode.worker.progress import Progress


def model_pooling(model: Any) -> str:
    """The pooling in force for ``model``: its ``{arch}.pooling_type`` by name, else mean."""
    buf = ctypes.create_string_buffer(256)

    def meta(key: str) -> str | None:
        n = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    arch = meta("general.architecture") or ""
    declared = meta(f"{arch}.pooling_type")
    return p.pooling_in_force(int(declared) if declared is not None and declared.isdigit() else None)


_POOLING_ENUM = {name: value for value, name in p.POOLING_TYPES.items()}


class Embedder:
    """The embedding context (made on first use) and the embed requests waiting for it."""

    def __init__(self, model: Any, settings: p.WorkerSettings, tokenize: Callable[[bytes, bool, bool], list[int]],
                 progress: Progress, attach_threadpool: Callable[[Any], None]) -> None:
        self._model = model
        self._tokenize = tokenize
        self._progress = progress
        self._attach_threadpool = attach_threadpool
        self._n_threads = settings.n_threads
        # The per-input limit in tokens (the module docstring says why it is n_batch).
        self.n_ctx = max(1, min(settings.n_batch, settings.n_ctx) if settings.n_ctx else settings.n_batch)
        self.pooling = model_pooling(model)
        # A rank model pools to its classifier's outputs (scores), the others to n_embd floats.
        self.dimensions = (llama_cpp.llama_model_n_cls_out(model) if self.pooling == "rank"
                           else llama_cpp.llama_model_n_embd(model))
        self.max_inputs = max_inputs(self.dimensions)
        self.queue: collections.deque[EmbedWork] = collections.deque()
        self.ctx: Any = None
        self.batch: llama_cpp.llama_batch | None = None
        self.n_seq_max = 0

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    def add(self, job: _Job) -> p.Failed | None:
        """Queue ``job`` (an EmbedRequest), or the Failed that refuses it as sent."""
        request = job.request
        assert isinstance(request, p.EmbedRequest)
        if len(request.input) > self.max_inputs:
            return p.Failed(id=job.id, code="bad_request",
                            message=f"input: {len(request.input)} inputs; a reply of this model's "
                                    f"{self.dimensions}-dimension vectors holds at most {self.max_inputs}")
        tokens = []
        for i, text in enumerate(request.input):
            try:
                t = self._tokenize(text.encode("utf-8"), True, False)
            except Exception as exc:  # llama_tokenize failing: this request only
                return p.Failed(id=job.id, code="internal", message=f"input[{i}]: {exc}")
            if not t:
                return p.Failed(id=job.id, code="bad_request", message=f"input[{i}] is empty (no tokens)")
            if len(t) > self.n_ctx:
                return p.Failed(id=job.id, code="context_overflow",
                                message=f"input[{i}] is {len(t)} tokens; the embedding context is "
                                        f"{self.n_ctx} tokens per input")
            tokens.append(t)
        self.queue.append(EmbedWork(job=job, tokens=tokens, normalize=request.normalize))
        return None

    def step(self, answer: Callable[[_Job, Any], None]) -> None:
        """End cancelled requests, decode the next batch of inputs, answer the requests it completes.

        An unexpected exception fails the embed requests waiting here (``internal``), not the worker.
        """
        try:
            self._step(answer)
        except Exception as exc:
            _log(f"embedding step failed:\n{traceback.format_exc().rstrip()}")
            while self.queue:
                w = self.queue.popleft()
                answer(w.job, p.Failed(id=w.job.id, code="internal", message=str(exc) or type(exc).__name__))

    def _step(self, answer: Callable[[_Job, Any], None]) -> None:
        if any(w.job.cancelled.is_set() for w in self.queue):
            for w in [w for w in self.queue if w.job.cancelled.is_set()]:
                self.queue.remove(w)
                done_tokens = sum(len(t) for t, v in zip(w.tokens, w.vectors) if v is not None)
                answer(w.job, _done(w.job, "cancelled", done_tokens, 0, None, None))
        if not self.queue:
            return
        if self.ctx is None:
            try:
                self._open()
            except Exception as exc:
                _log(f"cannot make the embedding context: {exc}")
                while self.queue:
                    w = self.queue.popleft()
                    answer(w.job, p.Failed(id=w.job.id, code="internal",
                                           message=f"cannot make the embedding context: {exc}"))
                return
        plan = take(self.queue, self.n_ctx, self.n_seq_max)
        if not self._decode(plan):
            failed = {id(w): w for w, _ in plan}
            for w in failed.values():
                self.queue.remove(w)
                answer(w.job, p.Failed(id=w.job.id, code="internal", message="llama_decode failed for the "
                                                                             "embedding batch"))
            return
        now = time.monotonic()
        while self.queue and self.queue[0].complete:
            self._reply(self.queue.popleft(), now, answer)
        # A request behind an unfinished one may be complete too (it took inputs after it).
        for w in [w for w in self.queue if w.complete]:
            self.queue.remove(w)
            self._reply(w, now, answer)

    def _reply(self, w: EmbedWork, now: float, answer: Callable[[_Job, Any], None]) -> None:
        vectors = [(unit(v) if w.normalize else v).tolist() for v in w.vectors if v is not None]
        done = _done(w.job, "stop", w.prompt_tokens, 0, now, now)
        answer(w.job, msgspec.structs.replace(done, embeddings=vectors))

    def _open(self) -> None:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx
        # As llama-cpp-python's embedding Llama: one sequence per input, at most one token each.
        cparams.n_seq_max = min(self.n_ctx, llama_cpp.llama_max_parallel_sequences())
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = self._n_threads
        cparams.embeddings = True
        cparams.pooling_type = _POOLING_ENUM[self.pooling]
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.ctx = ctx
        self._attach_threadpool(ctx)
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_seq_max = cparams.n_seq_max
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        for i in range(self.n_ctx):
            self.batch.n_seq_id[i] = 1
        _log(f"embedding context: {self.n_ctx} tokens per decode and per input, up to {self.n_seq_max} "
             f"inputs, {self.pooling} pooling, {self.dimensions} dimensions")

    def _decode(self, plan: list[tuple[EmbedWork, int]]) -> bool:
        """Decode ``plan``'s inputs as sequences 0..n-1 and store their vectors; False on failure."""
        b = self.batch
        assert b is not None
        token, pos, seq_id, logits = b.token, b.pos, b.seq_id, b.logits
        n = 0
        for seq, (w, i) in enumerate(plan):
            for k, t in enumerate(w.tokens[i]):
                token[n], pos[n], seq_id[n][0], logits[n] = t, k, seq, 1
                n += 1
        b.n_tokens = n
        llama_cpp.llama_memory_clear(self.mem, True)
        _blackbox.enter("embedding", n, len(plan), dict.fromkeys(w.job.id for w, _ in plan))
        _decode_hang.check(self._progress.steps)
        rc = llama_cpp.llama_decode(self.ctx, b)
        _blackbox.leave()
        self._progress.stepped()
        if rc != 0:
            _log(f"llama_decode returned {rc} for an embedding batch of {n} tokens, {len(plan)} inputs")
            llama_cpp.llama_memory_clear(self.mem, True)
            return False
        if TRACE:
            ids = dict.fromkeys(w.job.id for w, _ in plan)
            _log(f"embedding decode: {len(plan)} inputs, {n} tokens, requests {','.join(ids)}")
        for seq, (w, i) in enumerate(plan):
            ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            if not ptr:
                _log(f"no pooled embedding for sequence {seq}")
                return False
            w.vectors[i] = np.ctypeslib.as_array(ptr, shape=(self.dimensions,)).copy()
        return True

    def close(self) -> None:
        """Before the engine frees its threadpool and the model."""
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
