"""The model worker: one child process per enabled model, ``python -m optimanode.worker``.

It talks to its supervisor over stdin/stdout with the frames of ``optimanode.protocol`` and serves
up to ``WorkerSettings.parallel`` requests at once with continuous batching on llama.cpp's
low-level API. docs/architecture.md, "The worker, step by step", is the design note; each module
says how its part works:

* ``process``   start-up, the reader thread, exit codes (``__main__`` runs it)
* ``engine``    the model, the context and the serving loop: imports llama_cpp (as ``embed`` does)
* ``embed``     embed requests: a second context on the model, pooled vectors, inputs batched
* ``embedplan`` which inputs share an embedding decode; unit vectors; the reply's bound
* ``slots``     slot state and the pure choices: which slot, which moves, which batch
* ``text``      ``TextStream``: token bytes to whole-character chunks, stop strings
* ``jobs``      the request queue between the reader thread and the loop; ``Done`` timings
* ``progress``  the loop's decode steps, reported in each heartbeat answer (the stall watch)
* ``framing``   ``read_frame`` and the frame writer
* ``blackbox``  what the worker is doing, for the crash event; the tests' fault injection
* ``log``       stderr lines, the trace switch, exit codes

This package imports nothing itself, so ``from optimanode.worker.text import TextStream`` (or
jobs, progress, framing, slots, blackbox, log, embedplan) works without llama_cpp.
"""
