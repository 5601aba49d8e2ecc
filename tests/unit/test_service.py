"""The service's pure parts (optimanode/service.py): sd_notify environment handling, live settings, structured logs."""

from __future__ import annotations

import io
import json
import logging
import os
import uuid

import pytest

from optimanode.config import load_settings
from optimanode.service import (
    LineFormatter,
    Notifier,
    RedactFilter,
    Redactor,
    configure_logging,
    log_context,
    merge_live,
    raise_open_files_limit,
    stderr_is_journal,
    watchdog_interval,
)


@pytest.fixture(autouse=True)
def restore_root_log_level():
    """configure_logging sets the root level from the settings; give pytest its own back."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_without_notify_socket_every_notification_is_a_no_op():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_interval() is None


def test_from_environ_removes_the_variables_so_workers_do_not_inherit_them():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    n = Notifier.from_environ(env)
    assert n.address == "/run/systemd/notify" and n.watchdog_interval() == 15.0
    assert env == {"OTHER": "kept"}


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_a_relative_notify_socket_is_refused_rather_than_guessed():
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "run/notify"}).enabled


def test_merge_live_keeps_the_keys_that_need_a_restart():
    old = load_settings(environ={}, overrides={"models_dir": "/a", "listen.port": "8022", "scan.hash_models": "true"})
    new = load_settings(environ={}, overrides={"models_dir": "/b", "listen.port": "9000", "scan.hash_models": "false",
                                               "log_level": "debug", "drain_deadline_s": "5"})
    r = merge_live(old, new)
    assert (r.settings.models_dir, r.settings.listen.port, r.settings.scan.hash_models) == ("/a", 8022, True)
    assert (r.settings.log_level, r.settings.drain_deadline_s) == ("debug", 5.0)
    assert set(r.needs_restart) == {"models_dir", "listen.port", "scan.hash_models"}
    assert set(r.changed) == {"log_level", "drain_deadline_s"}


def test_journal_settings_are_restart_only_since_retention_holds_those_it_started_with():
    old = load_settings(environ={}, overrides={"journal.max_bytes": "1000000000"})
    r = merge_live(old, load_settings(environ={}, overrides={"journal.max_bytes": "2000000000"}))
    assert r.settings.journal.max_bytes == 1_000_000_000
    assert r.needs_restart == ("journal.max_bytes",) and r.changed == ()


def _logger(json_lines: bool = False, redactor: Redactor | None = None) -> tuple[logging.Logger, io.StringIO]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(LineFormatter(json_lines=json_lines))
    handler.addFilter(RedactFilter(redactor))
    logger = logging.getLogger(f"test.service.{uuid.uuid4().hex}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, buf


def test_log_lines_are_ts_level_logger_msg_then_fields_with_request_and_executor_ids():
    logger, buf = _logger()
    with log_context(request_id="r-1", executor_id="smollm2-1a2b3c4d"):
        logger.info("finished %s", "ok", extra={"tokens": 20, "reason": "max tokens"})
    logger.warning("no context")
    first, second = buf.getvalue().splitlines()
    ts, level, name, rest = first.split(" ", 3)
    assert ts.endswith("Z") and "T" in ts and level == "info" and name.startswith("test.service.")
    assert rest == 'finished ok request_id=r-1 executor_id=smollm2-1a2b3c4d reason="max tokens" tokens=20'
    assert second.split(" ", 3)[1:] == ["warning", second.split(" ")[2], "no context"]


def test_json_log_lines_carry_the_same_fields():
    logger, buf = _logger(json_lines=True)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed", extra={"request_id": "r-2"})
    doc = json.loads(buf.getvalue())
    assert doc["level"] == "error" and doc["msg"] == "failed" and doc["request_id"] == "r-2"
    assert "ValueError: boom" in doc["exc"]


def test_a_newline_in_a_message_cannot_forge_a_log_line_of_its_own():
    logger, buf = _logger()
    logger.warning("refused a Gateway from %s: %s", "127.0.0.1",
                   "bad hello: Invalid value 'x'\nINFO optimanode.gateway.server: Gateway 'admin' connected\r\x1b[2K")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed\nhere")
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("Invalid value 'x'\\nINFO optimanode.gateway.server: Gateway 'admin' connected\\r\\x1b[2K")
    assert lines[1].endswith(" failed\\nhere")
    assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"  # tracebacks keep their lines


def test_the_open_files_limit_is_raised_toward_what_the_hard_limit_allows():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        before, after = raise_open_files_limit(4096)
        want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert (before, after) == (256, want) and resource.getrlimit(resource.RLIMIT_NOFILE) == (want, hard)
        assert raise_open_files_limit(1024) == (want, want)  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_keys_nonces_and_private_keys_never_reach_the_log(tmp_path):
    import secrets

    key = secrets.token_urlsafe(32)
    logger, buf = _logger(redactor=Redactor([key]))
    hex_key, b64 = secrets.token_hex(32), secrets.token_urlsafe(32)
    logger.info("hello from gateway key=%s", b64)
    logger.info("handshake nonce %s", secrets.token_hex(16))
    logger.info("the key in a sentence: %s!", key)
    logger.info("raw %s", hex_key)
    logger.info("pem\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----")
    logger.info("header", extra={"authorization": "Bearer abcdefghijkl", "nonce": "0011223344556677"})
    try:
        raise RuntimeError(f"bad token={b64}")
    except RuntimeError:
        logger.exception("failed")
    # What must stay readable: request ids (uuid4 hex), model file names and paths, labelled hashes.
    rid, sha = uuid.uuid4().hex, "ab" * 32
    logger.info("request %s for /srv/models/Meta-Llama-3_1-8B-Instruct-Q4_K_M.gguf sha256=%s", rid, sha)
    out = buf.getvalue()
    for secret in (key, hex_key, b64, "MIIEvQIBADANBg", "abcdefghijkl", "0011223344556677"):
        assert secret not in out, secret
    assert out.count("[redacted]") >= 8
    assert rid in out and "Meta-Llama-3_1-8B-Instruct-Q4_K_M.gguf" in out and sha in out


def test_configure_logging_redacts_the_nodes_own_key_and_takes_its_level_from_settings(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "access.key").write_text("a-short-but-real-key-1\n")
    settings = load_settings(environ={}, overrides={"state_dir": str(state), "log_level": "warning"})
    buf = io.StringIO()
    handler = configure_logging(settings, stream=buf, syslog_prefix=True)
    try:
        assert logging.getLogger().level == logging.WARNING
        logging.getLogger("optimanode.test").warning("key is a-short-but-real-key-1 here")
        logging.getLogger("optimanode.test").info("not shown")
    finally:
        logging.getLogger().removeHandler(handler)
    line = buf.getvalue().strip()
    assert line.startswith("<4>") and "a-short-but-real-key-1" not in line and "[redacted]" in line
    assert "not shown" not in buf.getvalue()


def test_journald_stream_detection_compares_device_and_inode(tmp_path):
    f = (tmp_path / "stream").open("w")
    st = os.fstat(f.fileno())
    assert stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal(f, {})
    f.close()
