"""Settings: one typed, frozen object, built from layers.

Precedence, lowest first: built-in defaults < TOML file < environment (``OPTIMANODE_*``) < command line
(``--set section.key=value`` and a few named flags). Each layer is validated as it is merged, so an
error names the layer that brought the bad value: the file (with the key and what was expected),
the variable, or the flag. docs/configuration.md lists every key; keep it in step with this module.

Environment names are the dotted key in upper case with dots as underscores and an ``OPTIMANODE_``
prefix: ``restart.crash_budget`` → ``OPTIMANODE_RESTART_CRASH_BUDGET``.
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from optimanode.constraints import (
    ChatTemplate,
    EnableMode,
    FlashAttn,
    Fraction,
    Gpus,
    KeepAlive,
    KvCacheType,
    MainGpu,
    ModelDeadline,
    NBatch,
    NCtx,
    NGpuLayers,
    NThreads,
    ParallelSetting,
    Port,
    Prefill,
    PromptCacheMib,
    QueueSize,
    SafeMode,
    Seconds,
    SecondsOrZero,
    SplitMode,
    StallTimeout,
    TensorSplit,
    explain,
    unwrap,
)
from optimanode.errors import ConfigError

ENV_PREFIX = "OPTIMANODE_"
# Not settings: the workers' diagnostic switches (read by optimanode/worker/log.py and engine.py),
# which a node started with them passes on to every worker it starts, and the variables of the
# build and setup tools (tools/build-llama-cpp, tools/setup, tools/fetch-models, ...), which
# docs/operations.md has operators export before running them and then the node. Only these names:
# a misspelt one is still refused like any unknown setting.
WORKER_DIAGNOSTICS = frozenset({"OPTIMANODE_WORKER_TRACE", "OPTIMANODE_WORKER_STEP_LOG",
                                "OPTIMANODE_WORKER_THREADPOOL"})
TOOL_VARIABLES = frozenset({
    "OPTIMANODE_LLAMA_AMX", "OPTIMANODE_LLAMA_CMAKE_ARGS", "OPTIMANODE_LLAMA_BUILD_DIR",
    "OPTIMANODE_WHEEL_CACHE", "OPTIMANODE_MODEL_CACHE", "OPTIMANODE_FETCH_ALL",
    "OPTIMANODE_CUDA_BUILD_VENV",
})
NOT_SETTINGS = WORKER_DIAGNOSTICS | TOOL_VARIABLES


class Listen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "0.0.0.0"
    port: Port = 8022
    # The node access key (a shared secret with the Gateway); "" means <state_dir>/access.key.
    key_file: str = ""
    # TLS certificate and private key; "" means generated on first start under <state_dir>/tls/.
    cert_file: str = ""
    cert_key_file: str = ""
    # A connection must finish TCP, TLS and the HTTP upgrade within open_timeout_s of its accept,
    # then send its authenticated hello within hello_timeout_s: slow or idle peers are cut.
    open_timeout_s: Seconds = 10.0
    hello_timeout_s: Seconds = 5.0


class Scan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Seconds between rescans of models_dir (a rescan can also be asked for at any time).
    interval_s: Seconds = 30.0
    # Newly discovered models start enabled (true) or wait for an operator (false).
    enable_new: bool = False
    # Compute each model's SHA-256 content identity in the background (cached by path, size, mtime).
    hash_models: bool = True


class Restart(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # First delay after a crash; doubles with each crash in the window, up to backoff_cap_s.
    backoff_base_s: Seconds = 1.0
    backoff_cap_s: Seconds = 60.0
    # Each delay is stretched by a random fraction up to this, so crashed models do not restart in lockstep.
    jitter: Fraction = 0.2
    # crash_budget crashes within crash_window_s move the executor to `failed` until an operator acts:
    # a model that cannot stay up should not burn the CPU re-loading itself forever.
    crash_budget: Annotated[int, msgspec.Meta(ge=1, description="an integer >= 1")] = 5
    crash_window_s: Seconds = 300.0
    # A worker that answers no heartbeat for heartbeat_timeout_s is killed and counts as a crash.
    heartbeat_interval_s: Seconds = 1.0
    heartbeat_timeout_s: Seconds = 10.0
    # How long a loading worker may take before it counts as crashed.
    load_timeout_s: Seconds = 300.0
    # Stop: SIGTERM, then SIGKILL after this many seconds.
    stop_grace_s: SecondsOrZero = 5.0


class ModelDefaults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Context window in tokens; 0 means the model's own training context.
    n_ctx: NCtx = 2048
    # CPU threads for decoding; 0 means every core the node may use.
    n_threads: NThreads = 0
    # Layers offloaded to the GPU (0: CPU only, -1: all).
    n_gpu_layers: NGpuLayers = 0
    n_batch: NBatch = 512
    # Requests waiting per model beyond those being served; a full queue answers `overloaded`.
    queue_size: QueueSize = 16
    # Requests a worker serves at once (continuous batching: one decode step serves them all);
    # "auto": as many as fit in memory, up to 4, each with the whole n_ctx window (llama-server's
    # automatic slot count; docs/configuration.md, "GPUs and memory").
    parallel: ParallelSetting = "auto"
    # How prompts that wait share decode steps: auto, one_per_step or together (docs/configuration.md).
    prefill: Prefill = "auto"
    # auto, on or off: whether a model runs without llama.cpp's extra buffer types (weight
    # repacking, AMX) and its persistent threadpool (docs/configuration.md, "Safe mode").
    safe_mode: SafeMode = "auto"
    # Requests pending and no decode step for this long: the worker is hung, killed, and the model
    # crashes with the reason "stalled". 120 s is above the slowest legitimate step, one n_batch
    # prompt micro-batch (512 tokens at 4+ tokens/s, a large model on a small CPU), and still
    # ends a wedged stream within two minutes (docs/reliability.md, "A decode stalls").
    stall_timeout_s: StallTimeout = 120.0
    # A request's wall-time bound, queue wait included; 0: none. A request's own deadline_s can
    # only shorten it (docs/reliability.md, "A request runs past its deadline").
    deadline_s: ModelDeadline = 0.0
    # A llama.cpp built-in template name (chatml, gemma, ...) or Jinja text; unset: the GGUF's own
    # tokenizer.chat_template, else chatml (docs/configuration.md, "Chat templates").
    chat_template: ChatTemplate | None = None
    # The KV cache's element type: f16, q8_0 or q4_0 (a quantized cache needs flash attention).
    kv_cache_type: KvCacheType = "f16"
    # Flash attention: auto (llama.cpp decides per device), on or off.
    flash_attn: FlashAttn = "auto"
    # Placement on NVIDIA GPUs (with n_gpu_layers != 0): "auto" (the GPU, or fewest GPUs, with the
    # most free memory) or a list of indices; how layers are split (none, layer, row); the share
    # per GPU ([]: by free memory); the main GPU (an index into the model's GPUs).
    gpus: Gpus = "auto"
    split_mode: SplitMode = "layer"
    tensor_split: TensorSplit = msgspec.field(default_factory=list)
    main_gpu: MainGpu = 0
    # always: an enabled model stays loaded; on_demand: loaded by its first request, unloaded after
    # keep_alive_s without one, or evicted (least recently used first) when another needs memory.
    enable: EnableMode = "always"
    keep_alive_s: KeepAlive = 300.0
    # The worker's host-RAM prompt cache (sequence states of reused slots, keyed by their tokens):
    # MiB, 0 off, or "auto": an eighth of the RAM available once the model has loaded, at most
    # 8192 MiB (docs/configuration.md, "Prompt cache").
    prompt_cache_mib: PromptCacheMib = "auto"


class JournalSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Request events older than this are folded into per-model per-hour aggregates and deleted.
    request_retention_days: Annotated[float, msgspec.Meta(gt=0, description="a number of days > 0")] = 7.0
    # State events older than this, behind a checkpoint, are deleted (but see crashes_kept).
    state_retention_days: Annotated[float, msgspec.Meta(gt=0, description="a number of days > 0")] = 90.0
    # Crash transitions (with their stderr tails) kept per model whatever their age.
    crashes_kept: Annotated[int, msgspec.Meta(ge=0, description="an integer >= 0")] = 20
    # The file's cap: past 90 % of it retention folds the oldest requests early, down to 80 %.
    max_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, description="an integer >= 1048576 (1 MiB)")] = 1 << 30
    # A checkpoint is written when this long has passed, or checkpoint_events events, since the last.
    checkpoint_interval_s: Seconds = 600.0
    checkpoint_events: Annotated[int, msgspec.Meta(ge=1, description="an integer >= 1")] = 10_000
    # How often the retention task looks at the journal.
    retention_interval_s: Seconds = 60.0


# "" (off), "PORT" (on loopback) or "HOST:PORT" ("[v6]:PORT" for IPv6); the port 1 to 65535.
_PORT_RE = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
MetricsListen = Annotated[str, msgspec.Meta(
    pattern=rf"^(?:(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):)?{_PORT_RE})?$",
    description='"" (off), a port (served on 127.0.0.1) or HOST:PORT with a port from 1 to 65535, '
                'e.g. "9464", "0.0.0.0:9464" or "[::1]:9464"')]
# The address a bare port is served on: metrics tell a lot about the machine, so loopback unless asked.
METRICS_DEFAULT_HOST = "127.0.0.1"


class MetricsHttp(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # The OpenMetrics (Prometheus) endpoint, http://<listen>/metrics (optimanode/openmetrics.py);
    # "" keeps it off. Plain HTTP without authentication: expose it beyond loopback only to a
    # network the scraper shares (docs/operations.md, "Monitoring").
    listen: MetricsListen = ""


def metrics_address(listen: str) -> tuple[str, int] | None:
    """(host, port) of a ``metrics_http.listen`` value that passed its pattern; None when it is off."""
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep:
        return METRICS_DEFAULT_HOST, int(listen)
    return host.removeprefix("[").removesuffix("]"), int(port)


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    models_dir: str = "./models"
    # Holds the journal (journal.sqlite3), the access key and the generated certificate.
    state_dir: str = "./state"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Memory kept free for the rest of the machine when deciding whether a model fits.
    memory_reserve_mb: Annotated[int, msgspec.Meta(ge=0, description="an integer >= 0")] = 512
    # Kept free on each GPU likewise (the CUDA context itself, other processes' growth).
    vram_reserve_mb: Annotated[int, msgspec.Meta(ge=0, description="an integer >= 0")] = 256
    # A cap on the RAM estimates of all loaded models together (0: none, only what is available).
    memory_budget_mb: Annotated[int, msgspec.Meta(ge=0, description="an integer >= 0")] = 0
    # On SIGTERM, running requests may finish for this long; then they are cancelled (shutting_down).
    drain_deadline_s: SecondsOrZero = 30.0
    # A worker being replaced (configure, a new file, new model defaults) or disabled stops taking
    # requests and may finish the ones it has for this long; then they end cancelled (drain_timeout).
    drain_timeout_s: SecondsOrZero = 60.0
    listen: Listen = msgspec.field(default_factory=Listen)
    scan: Scan = msgspec.field(default_factory=Scan)
    restart: Restart = msgspec.field(default_factory=Restart)
    model_defaults: ModelDefaults = msgspec.field(default_factory=ModelDefaults)
    metrics_http: MetricsHttp = msgspec.field(default_factory=MetricsHttp)
    journal: JournalSettings = msgspec.field(default_factory=JournalSettings)

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def journal_path(self) -> Path:
        return self.state_path / "journal.sqlite3"

    @property
    def key_path(self) -> Path:
        return Path(self.listen.key_file) if self.listen.key_file else self.state_path / "access.key"





def _known_keys() -> dict[str, Any]:
    """Dotted key → the field's Python type, walked from the Structs themselves."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in msgspec.structs.fields(cls):
            if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
                walk(f.type, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = f.type

    walk(Settings, "")
    return out


KNOWN_KEYS = _known_keys()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(source: str, key: str, raw: str) -> Any:
    """Turn a string from the environment or the command line into the key's type."""
    if key not in KNOWN_KEYS:
        raise ConfigError(source, key, "a known key (see docs/configuration.md)")
    typ = unwrap(KNOWN_KEYS[key])
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        members = typing.get_args(typ)
        if members and int in {unwrap(m) for m in members}:
            # "4" or "auto" (model_defaults.parallel)
            return int(raw) if raw.strip().lstrip("-").isdigit() else raw
        if list in {typing.get_origin(unwrap(t)) for t in (typ, *members)}:
            # "0,1" or "[0, 1]" (model_defaults.gpus, model_defaults.tensor_split); "auto" stays
            text = raw.strip().removeprefix("[").removesuffix("]")
            if raw.strip() == "auto":
                return raw
            return [float(x) if "." in x else int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(source, key, typ.__name__, raw) from None
    return raw


def _validate(tree: dict[str, Any], source: str) -> Settings:
    """The settings of ``tree``; a value that breaks its type's limits is a ConfigError naming it."""
    try:
        return msgspec.convert(tree, Settings)
    except msgspec.ValidationError as exc:
        path, expected = explain(exc, Settings)
        if expected == "a known field":
            expected = "a known key (see docs/configuration.md)"
        got: Any = tree
        for part in path.split(".") if path else ():
            got = got.get(part) if isinstance(got, dict) else None
        raise ConfigError(source, path or "(top level)", expected,
                          got if path and expected != "a known key (see docs/configuration.md)" else None) from None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from every layer; raise ConfigError naming the layer, key and expectation."""
    tree: dict[str, Any] = {}
    _validate(tree, "defaults")
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(str(path), "(file)", "an existing TOML file") from None
        except OSError as exc:  # a directory, no read permission, an I/O error
            raise ConfigError(str(path), "(file)", f"a readable TOML file ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), "(syntax)", f"valid TOML ({exc})") from None
        except (ValueError, RecursionError) as exc:
            # tomllib's own limits: an integer past Python's 4,300 digits (ValueError), arrays nested
            # a few thousand deep (RecursionError). A bad file, like any other.
            raise ConfigError(str(path), "(syntax)", f"TOML within the parser's limits ({type(exc).__name__}: "
                                                     f"{str(exc)[:200]})") from None
        tree = _merge(tree, data)
        _validate(tree, str(path))
    env = os.environ if environ is None else environ
    env_layer: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG" or name in NOT_SETTINGS:
            continue
        key = _env_to_key(name)
        if key is None:
            raise ConfigError(f"environment {name}", name, "a known setting (see docs/configuration.md)")
        _set_dotted(env_layer, key, _coerce(f"environment {name}", key, raw))
    if env_layer:
        tree = _merge(tree, env_layer)
        _validate(tree, "environment")
    cli_layer: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        _set_dotted(cli_layer, key, _coerce("command line", key, raw))
    tree = _merge(tree, cli_layer)
    return _validate(tree, "command line")


def _env_to_key(name: str) -> str | None:
    want = name[len(ENV_PREFIX):].lower()
    for key in KNOWN_KEYS:
        if key.replace(".", "_") == want:
            return key
    return None


def default_config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The file named by OPTIMANODE_CONFIG, else /etc/optimanode/optimanode.toml if it exists."""
    env = os.environ if environ is None else environ
    if env.get(ENV_PREFIX + "CONFIG"):
        return env[ENV_PREFIX + "CONFIG"]
    system = Path("/etc/optimanode/optimanode.toml")
    return str(system) if system.exists() else None
