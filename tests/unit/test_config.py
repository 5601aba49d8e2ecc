"""Settings: defaults < TOML file < environment < command line; bad input names source, key and expectation."""

import pytest

from optimanode.config import KNOWN_KEYS, Settings, load_settings
from optimanode.errors import ConfigError


def test_defaults_listen_on_8022_and_need_no_file():
    s = load_settings(environ={})
    assert s.listen.port == 8022 and s.listen.host == "0.0.0.0"
    assert s == Settings()


def test_each_layer_overrides_the_one_below(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('models_dir = "/m"\n[listen]\nport = 9000\n[restart]\ncrash_budget = 7\n')
    s = load_settings(f, environ={})
    assert (s.models_dir, s.listen.port, s.restart.crash_budget) == ("/m", 9000, 7)
    s = load_settings(f, environ={"OPTIMANODE_LISTEN_PORT": "9100"})
    assert s.listen.port == 9100 and s.restart.crash_budget == 7
    s = load_settings(f, environ={"OPTIMANODE_LISTEN_PORT": "9100"}, overrides={"listen.port": "9200"})
    assert s.listen.port == 9200


def test_environment_values_are_converted_to_the_keys_type():
    s = load_settings(environ={"OPTIMANODE_SCAN_ENABLE_NEW": "yes", "OPTIMANODE_RESTART_JITTER": "0.5",
                               "OPTIMANODE_MODEL_DEFAULTS_N_CTX": "4096"})
    assert s.scan.enable_new is True and s.restart.jitter == 0.5 and s.model_defaults.n_ctx == 4096


def test_the_workers_diagnostic_variables_pass_but_a_misspelt_one_is_refused():
    from optimanode.config import WORKER_DIAGNOSTICS
    from optimanode.worker.log import STEP_LOG_VARIABLE, TRACE_VARIABLE

    assert {TRACE_VARIABLE, STEP_LOG_VARIABLE} <= WORKER_DIAGNOSTICS
    s = load_settings(environ={"OPTIMANODE_WORKER_TRACE": "1", "OPTIMANODE_WORKER_STEP_LOG": "/tmp/steps"})
    assert s == Settings()
    with pytest.raises(ConfigError, match="OPTIMANODE_WORKER_STEPLOG"):
        load_settings(environ={"OPTIMANODE_WORKER_STEPLOG": "/tmp/steps"})


# Read by a worker alone, never set for a node: a test's fault switch, the fd the supervisor hands over.
WORKER_ONLY = {"OPTIMANODE_TEST_FAULT", "OPTIMANODE_WORKER_BLACKBOX_FD"}


def test_every_optimanode_variable_the_tools_and_docs_name_is_a_setting_or_passes():
    """operations.md has operators export OPTIMANODE_LLAMA_AMX (and others) for the build tools and
    then run the node or doctor in the same shell: those must not make the node refuse to start."""
    import re
    from pathlib import Path

    from optimanode.config import NOT_SETTINGS, _env_to_key

    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(p for p in (root / "tools").iterdir() if p.is_file()),
             *(root / "optimanode").rglob("*.py")]
    named = {m for f in files for m in re.findall(r"(?<![A-Z0-9_])OPTIMANODE_[A-Z0-9_]*[A-Z0-9]", f.read_text(errors="replace"))}
    assert "OPTIMANODE_LLAMA_AMX" in named and "OPTIMANODE_WORKER_TRACE" in named  # the scan sees them
    refused = []
    for name in sorted(named - WORKER_ONLY - {"OPTIMANODE_CONFIG"}):
        try:
            load_settings(environ={name: "1"})
        except ConfigError as exc:
            if "a known setting" in str(exc):
                refused.append(name)
    assert refused == [], "named in the tools or docs, refused by the node"
    # And none of them shadows a setting of the same spelling.
    assert all(_env_to_key(name) is None for name in NOT_SETTINGS)


def test_a_wrong_type_in_the_file_names_the_file_the_key_and_the_expectation(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[listen]\nport = "eighty"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(f, environ={})
    msg = str(info.value)
    assert str(f) in msg and "listen.port" in msg and "int" in msg


def test_an_unknown_key_in_the_file_is_an_error_not_silently_ignored(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text("[restart]\ncrash_budjet = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(f, environ={})
    assert "restart.crash_budjet" in str(info.value) and str(f) in str(info.value)


def test_an_out_of_range_value_says_what_range_is_expected(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text("[listen]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"listen\.port: expected an integer from 1 to 65535, got 70000"):
        load_settings(f, environ={})


@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
def test_a_duration_is_finite_and_at_most_a_year(tmp_path, value):
    """An infinite drain_timeout_s once passed and reached the journal as null, which no reader decodes."""
    f = tmp_path / "node.toml"
    f.write_text(f"drain_timeout_s = {value}\n")
    with pytest.raises(ConfigError, match=r"drain_timeout_s: expected a number of seconds >= 0, at most a year"):
        load_settings(f, environ={})
    assert load_settings(environ={}, overrides={"drain_timeout_s": "31536000"}).drain_timeout_s == 31_536_000


def test_the_prefill_policy_is_one_of_the_protocols(tmp_path):
    from optimanode.protocol import PREFILL_POLICIES, WorkerSettings

    assert Settings().model_defaults.prefill == WorkerSettings(model_path="m").prefill == "auto"
    for policy in PREFILL_POLICIES:
        assert load_settings(environ={}, overrides={"model_defaults.prefill": policy}).model_defaults.prefill == policy
    f = tmp_path / "node.toml"
    f.write_text('[model_defaults]\nprefill = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"model_defaults\.prefill: expected one of auto, one_per_step, shortest_first, together"):
        load_settings(f, environ={})


def test_the_safe_mode_setting_is_one_of_the_protocols(tmp_path):
    from optimanode.protocol import SAFE_MODES

    assert Settings().model_defaults.safe_mode == "auto"
    for mode in SAFE_MODES:
        assert load_settings(environ={}, overrides={"model_defaults.safe_mode": mode}).model_defaults.safe_mode == mode
    f = tmp_path / "node.toml"
    f.write_text('[model_defaults]\nsafe_mode = "maybe"\n')
    with pytest.raises(ConfigError, match=r"model_defaults\.safe_mode: expected one of auto, on, off"):
        load_settings(f, environ={})


def test_broken_toml_names_the_file(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text("[listen\nport=1\n")
    with pytest.raises(ConfigError, match="valid TOML") as info:
        load_settings(f, environ={})
    assert str(f) in str(info.value)


@pytest.mark.parametrize("text", ["x = " + "9" * 5000, "x = " + "[" * 3000], ids=["5000-digit-integer", "nested"])
def test_a_file_past_the_toml_parsers_own_limits_is_a_config_error(tmp_path, text):
    f = tmp_path / "node.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=r"\(syntax\): expected TOML within the parser's limits"):
        load_settings(f, environ={})


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="an existing TOML file"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_a_directory_as_the_config_file_is_a_config_error_naming_it(tmp_path):
    d = tmp_path / "conf.d"
    d.mkdir()
    with pytest.raises(ConfigError, match="a readable TOML file") as info:
        load_settings(d, environ={})
    assert str(d) in str(info.value) and info.value.key == "(file)"


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="OPTIMANODE_LISTEN_PORT"):
        load_settings(environ={"OPTIMANODE_LISTEN_PORT": "http"})
    with pytest.raises(ConfigError, match="OPTIMANODE_LISTEN_PROT"):
        load_settings(environ={"OPTIMANODE_LISTEN_PROT": "1"})


def test_a_bad_command_line_value_is_attributed_to_the_command_line():
    with pytest.raises(ConfigError, match="command line: restart.crash_budget"):
        load_settings(environ={}, overrides={"restart.crash_budget": "0"})
    with pytest.raises(ConfigError, match="command line: nope"):
        load_settings(environ={}, overrides={"nope": "1"})


def test_every_key_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [k for k in KNOWN_KEYS if f"`{k}`" not in doc]
    assert missing == []


def test_the_link_timeouts_are_settings_the_server_uses(tmp_path):
    from optimanode.gateway.server import GatewayServer

    s = load_settings(environ={}, overrides={"listen.open_timeout_s": "3", "listen.hello_timeout_s": "1.5",
                                             "state_dir": str(tmp_path)})
    server = GatewayServer(None, s, lambda: None, "n")  # type: ignore[arg-type]
    assert (server.open_timeout_s, server.handshake_timeout_s) == (3.0, 1.5)
    default = GatewayServer(None, Settings(state_dir=str(tmp_path)), lambda: None, "n")  # type: ignore[arg-type]
    assert (default.open_timeout_s, default.handshake_timeout_s) == (10.0, 5.0)
    with pytest.raises(ConfigError, match=r"listen\.hello_timeout_s: expected a number of seconds > 0"):
        load_settings(environ={}, overrides={"listen.hello_timeout_s": "0"})
