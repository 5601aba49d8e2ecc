"""The node access key: the shared secret a Gateway proves it holds (gateway/handshake.py).

How it works:

* The key is 32 random bytes (``secrets.token_bytes``), stored as **one line of 64 lowercase hex
  digits** and a newline. Hex, not base64: it survives copy and paste, shells and config systems
  unchanged, and a truncated copy is always detectably the wrong length. Reading strips
  surrounding whitespace and accepts upper case too.
* Files are created only through ``write_private``: a fresh temporary file opened with
  ``os.open(..., O_CREAT | O_EXCL, 0o600)`` (so it is never, even for an instant, readable by
  anyone else), written, fsynced, then renamed over the target. Nothing chmods after writing.
* Reading *refuses* a key file readable or writable by group or others (``ConfigError`` naming the
  file and saying ``chmod 600``): a leaked key lets anyone run inference and reconfigure models,
  and a warning in a log nobody reads would not stop that.
* ``keygen(path)`` writes a new key and keeps the one it replaces in ``<path>.previous``. The node
  accepts both, so Gateways can be moved to the new key one by one; deleting ``<path>.previous``
  ends the rotation. ``KeyRing`` re-reads the files whenever they change on disk, so a rotation
  needs no restart.
* No function here logs or formats a key into a message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from optimanode.errors import ConfigError

log = logging.getLogger(__name__)

KEY_BYTES = 32


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def format_key(key: bytes) -> bytes:
    """The file contents for ``key``: 64 hex digits and a newline."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"an access key is {KEY_BYTES} bytes")
    return key.hex().encode("ascii") + b"\n"


def parse_key(data: bytes | str, source: str) -> bytes:
    """The 32 key bytes from a key file's contents; ConfigError (without the contents) otherwise."""
    text = data.decode("ascii", errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES or len(text) != 2 * KEY_BYTES:
        raise ConfigError(source, "access key", f"one line of {2 * KEY_BYTES} hex digits "
                          "(as written by `optimanode keygen`)")
    return key


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


def check_private(path: Path) -> None:
    """Refuse a file that group or others may read or write."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(str(path), "permissions", f"a file only its owner can read (chmod 600 {path})",
                          oct(mode))


def read_key(path: str | os.PathLike[str], *, check_mode: bool = True) -> bytes:
    """Load an access key file; ConfigError if it is missing, malformed or readable by others."""
    p = Path(path)
    try:
        if check_mode:
            check_private(p)
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), "access key", "an existing key file (create one with `optimanode keygen`)") from None
    except PermissionError:
        raise ConfigError(str(p), "access key", "a key file this user can read") from None
    return parse_key(data, str(p))


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, the file created mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory is synced.
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def keygen(path: str | os.PathLike[str]) -> Path:
    """Write a new key to ``path``; the key it replaces (if valid) moves to ``<path>.previous``."""
    p = Path(path)
    if p.exists():
        current = p.read_bytes()
        try:
            parse_key(current, str(p))
        except ConfigError:
            log.warning("the old key file %s did not hold a valid key; it is not kept as the previous key", p)
        else:
            write_private(previous_path(p), current)
    write_private(p, format_key(generate_key()))
    log.info("wrote a new access key to %s", p)
    return p


def ensure_key(path: str | os.PathLike[str]) -> bool:
    """Create the key file if it does not exist (first start); True when it was created."""
    p = Path(path)
    if p.exists():
        return False
    write_private(p, format_key(generate_key()))
    log.warning("generated a new node access key in %s; give a copy to each Gateway allowed to connect", p)
    return True


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)


class KeyRing:
    """The keys a handshake accepts: the current one, and ``<path>.previous`` while it exists.

    ``keys()`` stats both files and re-reads them only when they changed, so each handshake sees a
    rotation at once without re-reading the files every time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.previous = previous_path(self.path)
        self._stamp: tuple[object, object] | None = None
        self._keys: list[bytes] = []

    def keys(self) -> list[bytes]:
        stamp = (_stamp(self.path), _stamp(self.previous))
        if stamp != self._stamp:
            keys = [read_key(self.path)]
            if stamp[1] is not None:
                keys.append(read_key(self.previous))
            self._keys, self._stamp = keys, stamp
        return self._keys
