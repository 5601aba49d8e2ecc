"""The keygen and fingerprint commands (optimanode/client_cli.py) on a temporary state directory."""

from __future__ import annotations

from optimanode import client_cli
from optimanode.gateway import keys, tls
from system.test_gateway import make_settings


async def test_keygen_and_fingerprint_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPTIMANODE_CONFIG", raising=False)
    state = tmp_path / "state"
    assert client_cli.fingerprint_main(["--state-dir", str(state)]) == 2
    assert "first start" in capsys.readouterr().err
    assert client_cli.keygen_main(["--state-dir", str(state)]) == 0
    first = keys.read_key(state / "access.key")
    assert client_cli.keygen_main(["--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "access.key.previous" in out and first.hex() not in out  # the key itself is never printed
    assert keys.read_key(state / "access.key.previous") == first
    settings = make_settings(tmp_path)
    cert, _ = tls.ensure_certificate(settings, "cli-node")
    assert client_cli.fingerprint_main(["--state-dir", str(state)]) == 0
    assert capsys.readouterr().out.strip() == tls.fingerprint_file(cert)
