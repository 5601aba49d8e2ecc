"""The node's TLS server context over loopback: TLS 1.2 offers AEAD suites only (no CBC: LUCKY13, "obsolete")."""

from __future__ import annotations

import pytest


def _tls12_handshake(tmp_path, client_ciphers: str) -> str:
    """Handshake a TLS 1.2 client offering only ``client_ciphers`` with the node's server context."""
    import socket
    import ssl
    import threading

    from optimanode.gateway import tls

    cert_pem, key_pem = tls.generate_self_signed("node-test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    server_ctx = tls.server_context(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers(client_ciphers)
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw) as s:
                return s.cipher()[0]
    finally:
        t.join(10)
        listener.close()


def test_tls12_refuses_cbc_suites_and_serves_aead_ones(tmp_path):
    import ssl

    for cbc in ("ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"):
        with pytest.raises(ssl.SSLError):
            _tls12_handshake(tmp_path, cbc)
    assert _tls12_handshake(tmp_path, "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert _tls12_handshake(tmp_path, "ECDHE-ECDSA-CHACHA20-POLY1305") == "ECDHE-ECDSA-CHACHA20-POLY1305"
