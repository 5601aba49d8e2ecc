"""Measured, not assumed: the node beside direct llama-cpp-python and llama-server; lifecycle; soak.

Four subcommands (``compare`` is the default):

``tools/bench [compare]``
    In ONE run, with the same model, thread count, context per slot, n_batch and prompt set,
    greedy (temperature 0) and a fixed number of tokens per request:

    (a) ``direct``: llama-cpp-python's ``Llama(...).create_completion(stream=True)`` in a
        subprocess of its own (its memory and CPU apart from everything else). One ``Llama``
        serves one request at a time, so at concurrency N the N requests arrive together and are
        served in turn (what a Python server without batching would do).
    (b) ``node``: a real node subprocess (``python -m optimanode run --enable-new ...
        --set model_defaults.parallel=N``) reached over TLS WebSocket through
        ``optimanode.client.NodeClient`` (one connection; N requests multiplexed on it, as a
        Gateway does). One node per concurrency level.
    (c) ``llama-server`` (``--llama-server PATH``, or the build under /tmp/lcp if it exists):
        ``-np N -cb``, same threads and context per slot, ``/completion`` with ``stream: true,
        cache_prompt: false`` from N threads at once. Skipped with build instructions when absent.

    For each level (1, 4, 8) the three systems run in turn inside each round (--rounds, the
    order rotated each round) after a warm-up round, so the load of a shared machine falls on all
    of them alike. Each prompt starts with a number unique to its round, so no prefix cache can
    skip prompt tokens. Figures per system and level: TTFT (send → first token as the caller sees
    it), time per output token (TPOT, first → last token / (n − 1)), inter-token latency
    p50/p99 (gaps between successive chunks, pooled over the requests), tokens/s per stream and
    total tokens/s (completion tokens of all streams / send → last token of the round); for the
    node also the worker's own TTFT (InferDone.timings), the CPU time of the node process itself
    (psutil cpu_times of the node pid during its runs, not the worker) and the peak RSS (VmHWM)
    of node, worker, llama-server and the direct process. Ratios (b)/(a) and (b)/(c) are printed
    beside them (medians of the per-round ratios), and each target is marked met or missed.

``tools/bench lifecycle [--only PARTS]``
    spawn: spawn → ready per model; kill: a worker killed with SIGKILL under a stream → (i) the
    in-flight request's error, (ii) executor running again, (iii) first token of the next request,
    under the default restart policy and with no backoff; hang: a hung worker (SIGSTOP) detected
    by the heartbeat and replaced; flood: a Gateway flooding garbage frames and wrong-key
    handshakes beside a good one; journal: append throughput (concurrent appends through
    ``Journal``) and ``Journal.open`` + ``replay()`` of --journal-events events (default
    1,000,000; built with plain sqlite3 executemany, two mixes); scan: ``tools/bench-scan`` (the
    10,000-file target); metrics: ``tools/bench-metrics`` (what one metrics report costs).

``tools/bench soak --requests 1000``
    Distinct prompts to one model through the node, --concurrency in flight; RSS of node and
    worker every --every requests (100), tokens/s of the first and the last window, and whether
    RSS stays steady. Long: not run in CI.

``tools/bench embeddings [--batches 1,8,32] [--mode request|concurrent]``
    Inputs/s of embed requests through a node beside llama-server's ``/embedding`` (``--embedding
    --pooling mean``, same sources, model, threads and batch size), requests of 1, 8 and 32
    inputs, systems alternating within each round; the ratio node / llama-server per round and
    the cosine between their vectors (embeddings.py says how).

``tools/bench multiturn [--case one-node|pool|returning] [--nodes auto,shortest_first] [--servers 0,256]``
    Conversations that come back (issue 16): C conversations at once (--conversations 8), T turns
    each (--turns 6), a shared ~800-token system prompt plus a growing history, gaps between turns,
    on nodes (one per --nodes entry: its ``prefill`` policy) and llama-servers (one per --servers
    entry: N > 0 adds ``--cache-reuse N``; same sources, ``cache_prompt`` on, its default
    ``--cache-ram``), alternating rounds; TTFT p50 over all turns, turn 1, later turns and per turn,
    tokens/s, wall, cached prompt tokens, the share of later turns that landed where their prefix
    is, ratios node / llama-server against issue 16's goals. ``--case pool``: two nodes behind
    ``NodePool`` vs two llama-servers behind round-robin, with both nodes' slot occupancy sampled;
    ``--case returning``: a conversation back after every slot was reused vs a cold prompt of the
    same length. ``--plot OUT.png`` (or ``--replot IN.json --plot OUT.png``): TTFT p50 per turn.

``tools/bench plot IN.json OUT.png``
    Draw the compare plot again from a --json file.

Every figure of one invocation comes from that invocation; compare figures only within one.
Each target of issue #4 is printed as met / MISSED with its margin (or "not measured", or "smoke
size, not judged" when the run was smaller than the target). ``--json OUT`` writes everything
(``-`` for stdout); ``--plot OUT.png`` (compare) draws tokens/s and TTFT against concurrency
(needs matplotlib, which the node does not depend on: the tool says so before it starts).

Examples:
    tools/bench --quick                              # about a minute: 32 tokens, levels 1 and 4, 1 round
    tools/bench --json bench.json --plot bench.png   # the full comparison (tens of minutes on 2 cores)
    tools/bench --model gemma3 --threads 2
    tools/bench lifecycle --quick                    # about 2 minutes; 100,000-event journals
    tools/bench lifecycle --only journal             # just append throughput and the 1,000,000-event replay
    tools/bench lifecycle --json lifecycle.json
    tools/bench soak --requests 20                   # smoke; the real one is --requests 1000
    tools/bench embeddings --json embed.json         # a few minutes on 2 cores; needs tools/build-llama-server
    tools/bench multiturn --quick                    # a minute or two; the default workload: ~6 minutes
    tools/bench multiturn --case pool --threads 1 --conversations 16 --json pool.json --plot pool.png
"""

# Layout: cli.py (the parser, dispatch, clean-up); one module per subcommand: compare.py, lifecycle.py
# (with lifecycle_flood.py and lifecycle_journal.py for two of its parts), soak.py, plot.py,
# embeddings.py, multiturn.py; shared:
# common.py (paths, prompts, processes, figures, output, targets) and nodeproc.py (a node subprocess
# and its Gateway connection). tools/bench is the launcher (re-exec under .venv, then cli.main).

USAGE = __doc__ or ""  # the help text of tools/bench (cli.py)
