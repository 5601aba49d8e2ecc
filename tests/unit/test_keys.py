"""The Gateway access key files (optimanode/gateway/keys.py): keygen keeps the previous key; the keyring holds both."""

from __future__ import annotations

from optimanode.gateway import keys


async def test_keygen_keeps_the_previous_key_and_the_keyring_accepts_both(tmp_path):
    path = tmp_path / "k" / "access.key"
    keys.keygen(path)
    first = keys.read_key(path)
    keys.keygen(path)
    second = keys.read_key(path)
    assert first != second
    assert keys.read_key(keys.previous_path(path)) == first
    assert path.stat().st_mode & 0o777 == 0o600 and keys.previous_path(path).stat().st_mode & 0o777 == 0o600
    assert keys.KeyRing(path).keys() == [second, first]
