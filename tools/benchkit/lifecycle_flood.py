"""lifecycle's flood part: a good Gateway streaming alone, then beside a Gateway that floods the node.

How it works: the flooder is a child process, ``tools/bench _flood URL KEYHEX NICE`` (``flood_main``),
that runs until its stdin ends and then prints its counts as one JSON line. It keeps one
authenticated session (``raw_session``: the handshake spoken frame by frame, no pinning: it is the
attacker) sending garbage frames as fast as the node answers them, and opens wrong-key handshakes
in a loop from 127.0.0.2 (so the lockout they earn does not shut out the garbage session).
``flood_figure`` times two sequential requests of the good Gateway alone and then beside the
flood, per round, with the flooder at nice 19 (a Gateway on a machine of its own) and at nice 0
(competing for this machine's cores), and reads the node process's CPU around each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .common import LAUNCHER, cpu_s, log, med, prompts_for, round_figures
from .nodeproc import NodeProc


async def raw_session(url: str, key: bytes, gateway_id: str) -> Any:
    """An authenticated WebSocket speaking frames directly (the flooder does not pin: it is the attacker)."""
    import ssl

    from websockets.asyncio.client import connect

    from optimanode.client import LABEL_GATEWAY, LABEL_NODE, mac
    from optimanode.protocol import Challenge, Hello, Welcome, decode_from_node, encode_link

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ws = await connect(url, ssl=ctx, compression=None, proxy=None, open_timeout=10)
    ch = decode_from_node(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(ch, Challenge)
    ng = os.urandom(32)
    await ws.send(encode_link(Hello(version=1, gateway_id=gateway_id, nonce_g=ng,
                                    mac_g=mac(key, LABEL_GATEWAY, ch.nonce_n, ng, gateway_id, ch.node_id, 1))))
    welcome = decode_from_node(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(welcome, Welcome) and welcome.mac_n == mac(key, LABEL_NODE, ch.nonce_n, ng, gateway_id,
                                                                  ch.node_id, 1)
    return ws


async def flood(url: str, key: bytes, stop: asyncio.Event) -> dict[str, int]:
    """Garbage frames on an authenticated session and wrong-key handshakes, each as fast as the node answers."""
    import ssl

    import msgspec
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    from optimanode.client import LABEL_GATEWAY, mac
    from optimanode.protocol import Challenge, Hello, decode_from_node, encode_link

    counts = {"garbage_frames": 0, "bad_handshakes": 0}
    ws = await raw_session(url, key, "flooder")

    async def garbage() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            # Random bytes, or an infer without a model: each is answered with bad_request.
            await ws.send(os.urandom(64) if i % 2 else msgspec.msgpack.encode({"type": "infer", "id": f"x{i}"}))
            await asyncio.wait_for(ws.recv(), 30)
            counts["garbage_frames"] += 1
            await asyncio.sleep(0)

    async def wrong_key() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        wrong = os.urandom(32)
        while not stop.is_set():
            try:
                # From another loopback address: the lockout it earns does not shut out the garbage session.
                async with connect(url, ssl=ctx, compression=None, proxy=None, open_timeout=10,
                                   local_addr=("127.0.0.2", 0)) as c:
                    ch = decode_from_node(await c.recv())  # type: ignore[arg-type]
                    if isinstance(ch, Challenge):
                        ng = os.urandom(32)
                        await c.send(encode_link(Hello(version=1, gateway_id="intruder", nonce_g=ng, mac_g=mac(
                            wrong, LABEL_GATEWAY, ch.nonce_n, ng, "intruder", ch.node_id, 1))))
                        await c.recv()
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError, msgspec.DecodeError):
                pass
            counts["bad_handshakes"] += 1

    try:
        await asyncio.gather(garbage(), wrong_key())
    finally:
        with contextlib.suppress(Exception):
            await ws.close()
    return counts


def flood_main(argv: list[str]) -> int:
    url, keyhex, niceness = argv[0], argv[1], int(argv[2])
    # At nice 19 the flooder stands in for a Gateway on a machine of its own (its own CPU is then not
    # what slows the node's worker down); at nice 0 it also competes for this machine's cores.
    os.nice(niceness)

    async def go() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        def wait_eof() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_eof, daemon=True).start()
        counts = await flood(url, bytes.fromhex(keyhex), stop)
        counts["seconds"] = round(time.perf_counter() - t0, 2)  # type: ignore[assignment]
        return counts

    print(json.dumps(asyncio.run(go())), flush=True)
    return 0


async def flood_figure(model: str, work: Path, threads: int, rounds: int, tokens: int) -> dict[str, Any]:
    node = NodeProc(model, work, tag="flood", sets={
        "model_defaults.n_threads": threads, "model_defaults.n_ctx": 512, "scan.hash_models": "false"})
    out: dict[str, Any] = {
        "threads": threads, "tokens": tokens, "requests_per_measure": 2,
        "flood": "one authenticated session sending garbage frames (random bytes / an infer without a model) "
                 "as fast as the node answers them, plus wrong-key handshakes in a loop from 127.0.0.2 (after 5 "
                 "failures that address is locked out and each new connection is closed with 4008 at once, "
                 "but each still costs the node a TLS handshake)", "modes": {}}
    try:
        await node.start()
        key, _ = node.credentials()
        await node.run(prompts_for(0, 1), 8)  # warm-up
        for niceness in (19, 0):
            alone, flooded, rates = [], [], []
            nc_alone = nc_flood = w_alone = w_flood = 0.0
            for r in range(1, rounds + 1):
                c0, t = cpu_s(node.pid), time.perf_counter()
                s = await node.run(prompts_for(r, 2, offset=niceness), tokens, sequential=True)
                nc_alone += cpu_s(node.pid) - c0
                w_alone += time.perf_counter() - t
                alone.append(round_figures(s)["total_tok_s"])
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, str(LAUNCHER), "_flood", node.url, key.hex(), str(niceness),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                await asyncio.sleep(1.0)  # let the flood get going
                c0, t = cpu_s(node.pid), time.perf_counter()
                s = await node.run(prompts_for(r, 2, offset=50 + niceness), tokens, sequential=True)
                nc_flood += cpu_s(node.pid) - c0
                w_flood += time.perf_counter() - t
                flooded.append(round_figures(s)["total_tok_s"])
                stdout, _ = await proc.communicate(b"")
                rates.append(json.loads(stdout or b"{}"))
                log(f"flood (flooder at nice {niceness}) round {r}: alone {alone[-1]:.1f} tok/s, beside the flood "
                    f"{flooded[-1]:.1f} tok/s; flooder {rates[-1]}")
            secs = sum(x.get("seconds", 0) for x in rates) or 1
            out["modes"][f"nice {niceness}"] = {
                "alone_tok_s": alone, "flooded_tok_s": flooded,
                "flooded_over_alone": med([f / a for f, a in zip(flooded, alone)]),
                "node_cpu_pct_alone": nc_alone / w_alone * 100, "node_cpu_pct_flooded": nc_flood / w_flood * 100,
                "garbage_frames_per_s": sum(x.get("garbage_frames", 0) for x in rates) / secs,
                "bad_handshakes_per_s": sum(x.get("bad_handshakes", 0) for x in rates) / secs, "flooder": rates}
        return out
    finally:
        await node.close()
