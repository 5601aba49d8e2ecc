"""The Gateway-link handshake as arithmetic (no sockets), and the per-address failure limiter.

The test vector at the top is the one printed in docs/protocol.md: a Gateway written from that page
alone computes these bytes, so the page and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from optimanode import client
from optimanode.gateway.handshake import (
    LABEL_GATEWAY,
    LABEL_NODE,
    FailureLimiter,
    HandshakeError,
    check_hello,
    check_welcome,
    choose_version,
    gateway_mac,
    make_hello,
    new_challenge,
    node_mac,
    transcript,
)
from optimanode.protocol import (
    PROTOCOL_MINOR,
    Challenge,
    CompletionRequest,
    Hello,
    Infer,
    InferDone,
    SamplingParams,
    Timings,
    TokenChunk,
    Usage,
    Welcome,
    decode_from_gateway,
    decode_from_node,
    encode_link,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
NONCE_N = bytes(range(0x40, 0x60))
NONCE_G = bytes(range(0x80, 0xA0))


def test_the_documented_test_vector():
    t = transcript(NONCE_N, NONCE_G, "gw-1", "node-1", 1)
    assert t.hex() == (
        "00000020404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
        "00000020808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
        "0000000467772d31" "000000066e6f64652d31" "0000000400000001")
    assert gateway_mac(KEY, NONCE_N, NONCE_G, "gw-1", "node-1", 1).hex() == \
        "42bbd458085c1a7f404161a67a6a823f31e83721d6c36ea35b2640a0d9f9648e"
    assert node_mac(KEY, NONCE_N, NONCE_G, "gw-1", "node-1", 1).hex() == \
        "cb9d272362bfadc8fe03d7545c993c299c53c95c75265f6552fbb3afd4a1242d"
    # Both ends compute with optimanode.link (one copy); the independent reference is the vector
    # above, as data. The client's names (used by tools that speak the protocol) are the same.
    assert client.mac(KEY, client.LABEL_GATEWAY, NONCE_N, NONCE_G, "gw-1", "node-1", 1).hex() == \
        "42bbd458085c1a7f404161a67a6a823f31e83721d6c36ea35b2640a0d9f9648e"
    assert client.mac(KEY, client.LABEL_NODE, NONCE_N, NONCE_G, "gw-1", "node-1", 1).hex() == \
        "cb9d272362bfadc8fe03d7545c993c299c53c95c75265f6552fbb3afd4a1242d"
    assert (LABEL_GATEWAY, LABEL_NODE) == (b"optimanode/v1 gateway", b"optimanode/v1 node")
    assert (len(LABEL_GATEWAY), len(LABEL_NODE)) == (21, 18)  # as docs/protocol.md says


def test_the_right_key_passes_both_ways():
    challenge = new_challenge("node-1")
    assert len(challenge.nonce_n) == 32 and challenge.versions == [1]
    hello = make_hello(KEY, challenge, "gw-1")
    # The frames survive the wire.
    hello = decode_from_gateway(encode_link(hello))
    welcome = check_hello([KEY], challenge, hello)
    assert welcome.node_id == "node-1" and welcome.version == 1
    check_welcome(KEY, challenge, hello, welcome)  # the gateway is satisfied: no exception


def test_fresh_nonces_every_time():
    assert new_challenge("n").nonce_n != new_challenge("n").nonce_n
    c = new_challenge("n")
    assert make_hello(KEY, c, "g").nonce_g != make_hello(KEY, c, "g").nonce_g


def test_a_wrong_key_fails_and_says_nothing_more_than_unauthorized():
    challenge = new_challenge("node-1")
    hello = make_hello(OTHER, challenge, "gw-1")
    with pytest.raises(HandshakeError) as info:
        check_hello([KEY], challenge, hello)
    assert info.value.close_code == 4001 and info.value.reason == "unauthorized"


def test_the_previous_key_is_accepted_during_a_rotation_and_the_node_answers_with_it():
    challenge = new_challenge("node-1")
    old_gateway = make_hello(OTHER, challenge, "gw-old")
    welcome = check_hello([KEY, OTHER], challenge, old_gateway)
    check_welcome(OTHER, challenge, old_gateway, welcome)
    with pytest.raises(HandshakeError):
        check_welcome(KEY, challenge, old_gateway, welcome)
    new_gateway = make_hello(KEY, challenge, "gw-new")
    check_welcome(KEY, challenge, new_gateway, check_hello([KEY, OTHER], challenge, new_gateway))
    # After the rotation ends only the new key is accepted.
    with pytest.raises(HandshakeError):
        check_hello([KEY], challenge, old_gateway)


@pytest.mark.parametrize("field", ["nonce_n", "nonce_g", "gateway_id", "node_id", "version"])
def test_any_tampered_field_fails(field):
    challenge = new_challenge("node-1", [1, 2], nonce_n=NONCE_N)
    hello = make_hello(KEY, challenge, "gw-1", version=1, nonce_g=NONCE_G)
    if field == "nonce_n":
        challenge = msgspec.structs.replace(challenge, nonce_n=bytes(32))
    elif field == "node_id":
        challenge = msgspec.structs.replace(challenge, node_id="node-2")
    elif field == "nonce_g":
        hello = msgspec.structs.replace(hello, nonce_g=bytes(32))
    elif field == "gateway_id":
        hello = msgspec.structs.replace(hello, gateway_id="gw-2")
    else:
        hello = msgspec.structs.replace(hello, version=2)
    with pytest.raises(HandshakeError) as info:
        check_hello([KEY], challenge, hello)
    assert info.value.close_code == 4001


def test_a_replayed_hello_fails_against_a_new_challenge():
    first = new_challenge("node-1")
    hello = make_hello(KEY, first, "gw-1")
    check_hello([KEY], first, hello)
    with pytest.raises(HandshakeError):
        check_hello([KEY], new_challenge("node-1"), hello)


def test_a_version_the_node_did_not_offer_is_refused_with_4003():
    challenge = new_challenge("node-1", [1])
    hello = make_hello(KEY, challenge, "gw-1", version=7)
    with pytest.raises(HandshakeError) as info:
        check_hello([KEY], challenge, hello)
    assert info.value.close_code == 4003
    assert choose_version([1, 2, 3], [2, 3, 4]) == 3 and choose_version([1], [2]) is None
    with pytest.raises(HandshakeError) as info:
        make_hello(KEY, new_challenge("n", [9]), "gw")
    assert info.value.close_code == 4003


def test_the_nodes_mac_differs_from_the_gateways_so_a_reflected_mac_fails():
    challenge = new_challenge("node-1")
    hello = make_hello(KEY, challenge, "gw-1")
    welcome = check_hello([KEY], challenge, hello)
    assert welcome.mac_n != hello.mac_g
    # A man in the middle without the key answers the gateway with the gateway's own MAC.
    reflected = Welcome(version=hello.version, node_id=challenge.node_id, mac_n=hello.mac_g)
    with pytest.raises(HandshakeError):
        check_welcome(KEY, challenge, hello, reflected)
    # And a node with another key cannot produce a Welcome the gateway accepts.
    forged = Welcome(version=1, node_id="node-1",
                     mac_n=node_mac(OTHER, challenge.nonce_n, hello.nonce_g, "gw-1", "node-1", 1))
    with pytest.raises(HandshakeError):
        check_welcome(KEY, challenge, hello, forged)
    # The welcome must name the same node and version.
    with pytest.raises(HandshakeError):
        check_welcome(KEY, challenge, hello, msgspec.structs.replace(welcome, node_id="node-2"))


def test_the_transcript_is_unambiguous():
    # Without length prefixes these two would be the same bytes.
    a = transcript(NONCE_N, NONCE_G, "gw-1n", "ode-1", 1)
    b = transcript(NONCE_N, NONCE_G, "gw-1", "node-1", 1)
    assert a != b
    assert gateway_mac(KEY, NONCE_N, NONCE_G, "gw-1n", "ode-1", 1) != gateway_mac(KEY, NONCE_N, NONCE_G, "gw-1", "node-1", 1)


def test_malformed_hellos_do_not_decode():
    good = make_hello(KEY, new_challenge("n"), "gw")
    for bad in ({"nonce_g": b"short"}, {"mac_g": b"x" * 31}, {"gateway_id": ""}, {"gateway_id": "g" * 129}):
        raw = msgspec.to_builtins(good, builtin_types=(bytes,)) | bad
        with pytest.raises(msgspec.ValidationError):
            decode_from_gateway(msgspec.msgpack.encode(raw))
    assert isinstance(decode_from_gateway(encode_link(good)), Hello)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_locks_an_address_out_after_n_failures_in_the_window():
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window_s=10, lockout_s=30, clock=clock)
    for _ in range(2):
        lim.failure("10.0.0.1")
        assert lim.blocked_for("10.0.0.1") == 0.0
    lim.failure("10.0.0.1")
    assert lim.blocked_for("10.0.0.1") == 30.0
    assert lim.blocked_for("10.0.0.2") == 0.0  # other addresses are not affected
    clock.now += 29.5
    assert lim.blocked_for("10.0.0.1") == pytest.approx(0.5)
    clock.now += 0.5
    assert lim.blocked_for("10.0.0.1") == 0.0
    # After the lockout the count starts afresh.
    lim.failure("10.0.0.1")
    assert lim.blocked_for("10.0.0.1") == 0.0


def test_failures_spread_wider_than_the_window_do_not_lock_out():
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window_s=10, lockout_s=30, clock=clock)
    for _ in range(10):
        lim.failure("a")
        clock.now += 6  # at most two failures in any 10 s
        assert lim.blocked_for("a") == 0.0


def test_a_success_clears_the_failures_of_an_address():
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window_s=10, lockout_s=30, clock=clock)
    lim.failure("a")
    lim.failure("a")
    lim.success("a")
    lim.failure("a")
    lim.failure("a")
    assert lim.blocked_for("a") == 0.0
    lim.failure("a")
    assert lim.blocked_for("a") == 30.0


def test_the_limiter_tracks_a_bounded_number_of_addresses():
    clock = FakeClock()
    lim = FailureLimiter(max_failures=2, window_s=10, lockout_s=30, clock=clock, max_addresses=100)
    lim.failure("victim")
    lim.failure("victim")  # locked out
    for i in range(1000):
        lim.failure(f"10.1.{i // 256}.{i % 256}")
    assert len(lim._failures) + len(lim._locked_until) <= 100
    # A live lockout is not what gets dropped to make room.
    assert lim.blocked_for("victim") == 30.0


def test_the_worked_example_in_docs_protocol_md_is_what_the_code_sends():
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    blocks = dict(re.findall(r"<!-- frame: (\w+) -->\n```\n(.*?)```", text, re.S))

    def frame(name: str) -> bytes:
        return bytes.fromhex(blocks[name])

    challenge = Challenge(versions=[1], node_id="node-1", nonce_n=NONCE_N)
    hello = make_hello(KEY, challenge, "gw-1", nonce_g=NONCE_G)
    assert frame("challenge") == encode_link(challenge)
    assert frame("hello") == encode_link(hello)
    assert frame("welcome") == encode_link(check_hello([KEY], challenge, hello))
    assert decode_from_gateway(frame("infer")) == Infer(
        id="r1", model="smollm2-9f86d081",
        request=CompletionRequest(prompt="The capital of France is", params=SamplingParams(max_tokens=2, temperature=0.0)))
    assert frame("chunk") == encode_link(TokenChunk(id="r1", text=" Paris", tokens=1))
    assert frame("done") == encode_link(InferDone(id="r1", finish_reason="length",
                                                  usage=Usage(prompt_tokens=5, completion_tokens=2),
                                                  timings=Timings(ttft_s=0.25, tokens_per_s=20.0, total_s=0.3)))


def test_the_welcome_says_the_nodes_minor_version_and_an_older_welcome_reads_as_minor_0():
    challenge = Challenge(versions=[1], node_id="node-1", nonce_n=NONCE_N)
    hello = make_hello(KEY, challenge, "gw-1", nonce_g=NONCE_G)
    welcome = check_hello([KEY], challenge, hello)
    assert welcome.minor == PROTOCOL_MINOR >= 1
    # A node from before minors sent no "minor": a Gateway reads it as 0 and uses none of the additions.
    older = msgspec.msgpack.encode({k: v for k, v in msgspec.structs.asdict(welcome).items() if k != "minor"}
                                   | {"type": "welcome"})
    assert decode_from_node(older).minor == 0


def test_the_limits_count_an_ipv4_address_as_itself_and_an_ipv6_one_by_its_64_network():
    from optimanode.gateway.server import limit_key

    assert limit_key("192.0.2.7") == "192.0.2.7"
    assert limit_key("::ffff:192.0.2.7") == "192.0.2.7"  # an IPv4 peer on a dual-stack socket
    # A host given a /64 does not get a fresh budget from each of its addresses.
    assert limit_key("2001:db8:1:2::1") == limit_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("fe80::1%eth0") == "fe80::/64"
    assert limit_key("not an address") == "not an address"
