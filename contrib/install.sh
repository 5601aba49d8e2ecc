#!/usr/bin/env bash
# Install OptimaNode as a systemd service on Debian or Ubuntu, from this checkout.
# Safe to run again: it upgrades the installed package, never overwrites the settings file or the
# access key, and restarts a running service so that the new version takes over.
# docs/operations.md walks through the same steps by hand.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: contrib/install.sh [options]

Installs OptimaNode from this checkout as the systemd service "optimanode":
  - the system user and group optimanode (no login, home /var/lib/optimanode)
  - /opt/optimanode/src (a copy of this checkout), built as a wheel and installed into /opt/optimanode/venv
    with llama-cpp-python
  - /etc/optimanode/optimanode.toml (only if absent) and /etc/optimanode/access.key (only if absent, 0600)
  - /srv/optimanode/models (models, read-only for the service) and /var/lib/optimanode (journal, state)
  - /etc/systemd/system/optimanode.service (+ the nvidia.conf drop-in on NVIDIA machines)
  - systemctl daemon-reload && systemctl enable --now optimanode (restart if it was running)

Options:
  --cuda            build llama-cpp-python with CUDA (needs the CUDA toolkit: nvcc on PATH)
                    (the build flags: tools/build-llama-cpp; OPTIMANODE_LLAMA_AMX=1 opts back in to AMX)
  --nvidia          install the NVIDIA drop-in even if /dev/nvidiactl is not there yet
  --no-nvidia       never install the NVIDIA drop-in
  --models-dir DIR  models directory written to a new settings file (default /srv/optimanode/models)
  --port PORT       listen port written to a new settings file (default 8022)
  --no-start        install everything but do not enable or start the service
  --skip-apt        do not apt-get install the build prerequisites
  --python PATH     the Python 3.11+ to build the environment from (default /usr/bin/python3)
  --wheels DIR      install without the network, from the wheels in DIR only (pip --no-index
                    --find-links DIR): every dependency, llama-cpp-python built for this machine, and
                    setuptools>=68 for building OptimaNode itself
  -h, --help        this text

Other llama.cpp backends are chosen with OPTIMANODE_LLAMA_CMAKE_ARGS (see docs/operations.md):
  Metal (macOS, the default there), Vulkan -DGGML_VULKAN=on, ROCm/HIP -DGGML_HIP=on, SYCL -DGGML_SYCL=on.
Uninstall with contrib/uninstall.sh (keeps the journal unless --purge).
EOF
}

PREFIX=/opt/optimanode
VENV=$PREFIX/venv
ETC=/etc/optimanode
STATE=/var/lib/optimanode
MODELS=/srv/optimanode/models
PORT=8022
UNIT_DIR=/etc/systemd/system
CUDA=0
NVIDIA=auto
START=1
APT=1
WHEELS=
# The system's Python, not one under /root or /home: the service cannot reach those (ProtectHome=).
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3 || echo python3)

while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) CUDA=1 ;;
    --nvidia) NVIDIA=1 ;;
    --no-nvidia) NVIDIA=0 ;;
    --models-dir) MODELS=${2:?--models-dir needs a directory}; shift ;;
    --port) PORT=${2:?--port needs a number}; shift ;;
    --no-start) START=0 ;;
    --skip-apt) APT=0 ;;
    --python) PYTHON=${2:?--python needs a path}; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
# The service user reads /opt/optimanode and the unit file: a hardened root umask (027, 077) must not
# make them private. What has to be private (the key, the settings) gets its mode explicitly.
umask 022
pip_source=()
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "install.sh: --wheels: no directory $WHEELS" >&2; exit 2; }
  WHEELS=$(cd "$WHEELS" && pwd)
  pip_source=(--no-index --find-links "$WHEELS")
fi
say() { printf 'install.sh: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo contrib/install.sh)" >&2
  exit 1
fi
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/contrib/systemd/optimanode.service" ]; then
  echo "install.sh: run it from an OptimaNode checkout ($SRC has no pyproject.toml)" >&2
  exit 1
fi

# 1. Prerequisites: Python 3.11+ with venv, and a C/C++ toolchain (llama-cpp-python builds llama.cpp).
if [ "$APT" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  [ -x "$PYTHON" ] || missing+=(python3)
  "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v c++ >/dev/null 2>&1 || missing+=(build-essential)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
  fi
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1)); use --python" >&2
  exit 1
fi
case "$(readlink -f "$PYTHON")" in
  /root/*|/home/*)
    echo "install.sh: $PYTHON lives under /root or /home, which the service cannot reach; use --python" >&2
    exit 1 ;;
esac

# 2. The system user: no login shell, no home of its own beyond the state directory.
if ! getent group optimanode >/dev/null; then
  groupadd --system optimanode
fi
if ! getent passwd optimanode >/dev/null; then
  useradd --system --gid optimanode --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
    --comment "OptimaNode inference node" optimanode
  say "created the system user optimanode"
fi

# 3. A copy of the source in /opt/optimanode/src (the installed optimanode-inspect-journal runs its
# tools/inspect-journal), and OptimaNode installed into the virtual environment from a wheel built
# from that copy: the wheel carries the package and the journal's migrations (package data), so the
# environment needs neither this checkout nor the copy.
install -d -m 0755 "$PREFIX"
rm -rf "$PREFIX/src.new"
install -d -m 0755 "$PREFIX/src.new"
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./state --exclude=./models --exclude=./.cache \
  --exclude='__pycache__' --exclude='*.egg-info' --exclude=./.pytest_cache --exclude=./.mypy_cache \
  --exclude=./.import_linter_cache -cf - . | tar -C "$PREFIX/src.new" -xf -
rm -rf "$PREFIX/src.old"
if [ -d "$PREFIX/src" ]; then mv "$PREFIX/src" "$PREFIX/src.old"; fi
mv "$PREFIX/src.new" "$PREFIX/src"
rm -rf "$PREFIX/src.old"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${pip_source[@]}" --upgrade pip
say "installing OptimaNode into $VENV (building llama-cpp-python can take several minutes)${WHEELS:+, from $WHEELS only}"
# The wheel is built in a scratch copy, so the build leaves nothing (build/, *.egg-info) in
# /opt/optimanode/src; with --wheels, its build backend (setuptools>=68) comes from DIR too.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -a "$PREFIX/src" "$scratch/src"
"$VENV/bin/python" -m pip wheel --quiet "${pip_source[@]}" --no-deps --wheel-dir "$scratch/dist" "$scratch/src"
node_wheel=("$scratch"/dist/optimanode-*.whl)
[ -f "${node_wheel[0]}" ] || { echo "install.sh: building the OptimaNode wheel gave no $scratch/dist/optimanode-*.whl" >&2; exit 1; }
if [ -z "$WHEELS" ]; then
  # llama-cpp-python built by tools/build-llama-cpp: the project's one set of build flags (no AMX
  # kernels; docs/operations.md "The llama.cpp build"), cached under a key of those flags.
  build_args=()
  [ "$CUDA" = 1 ] && build_args+=(--cuda)
  wheel=$(PYTHON="$VENV/bin/python" bash "$PREFIX/src/tools/build-llama-cpp" "${build_args[@]}" | tail -1)
  "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
  "$VENV/bin/python" -m pip install --quiet --upgrade "$wheel" "${node_wheel[0]}"
else
  "$VENV/bin/python" -m pip install --quiet "${pip_source[@]}" --upgrade "${node_wheel[0]}"
fi
# pip keeps an installed version equal to the wheel's (an upgrade whose version number did not
# change): put this wheel's code in place whatever was there, an older editable install included.
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "${node_wheel[0]}"
# The post-mortem tool: optimanode-inspect-journal --state-dir /var/lib/optimanode timeline
install -d -m 0755 "$PREFIX/bin"
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$VENV/bin/python" "$PREFIX/src/tools/inspect-journal" \
  >"$PREFIX/bin/optimanode-inspect-journal"
chmod 0755 "$PREFIX/bin/optimanode-inspect-journal"
install -d -m 0755 "$PREFIX/share/doc/optimanode"
install -m 0644 "$SRC/docs/operations.md" "$SRC/docs/configuration.md" "$PREFIX/share/doc/optimanode/"

# 4. Directories. The state directory is the service's own; models are read-only for it.
install -d -o optimanode -g optimanode -m 0700 "$STATE"
install -d -o root -g optimanode -m 0750 "$MODELS"
install -d -o root -g optimanode -m 0755 "$ETC"

# 5. Settings: written once; an operator's edits are never overwritten.
if [ ! -e "$ETC/optimanode.toml" ]; then
  cat >"$ETC/optimanode.toml" <<EOF
# OptimaNode settings (docs/configuration.md). Reload after editing: systemctl reload optimanode
models_dir = "$MODELS"
state_dir = "$STATE"

[listen]
port = $PORT
key_file = "$ETC/access.key"
EOF
  chown root:optimanode "$ETC/optimanode.toml"
  chmod 0640 "$ETC/optimanode.toml"
  say "wrote $ETC/optimanode.toml"
fi

# 6. The access key the Gateway presents: made once, readable by the node's user only.
if [ ! -e "$ETC/access.key" ]; then
  if "$VENV/bin/optimanode" keygen --help >/dev/null 2>&1; then
    "$VENV/bin/optimanode" keygen --key-file "$ETC/access.key"
  else
    # A node without the keygen command: the same format, 32 random bytes as 64 hex digits.
    (umask 077 && "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' >"$ETC/access.key")
  fi
  say "generated $ETC/access.key (give its content to the Gateway; docs/operations.md)"
fi
chown optimanode:optimanode "$ETC/access.key"
chmod 0600 "$ETC/access.key"

# 7. The unit, and the NVIDIA drop-in where there is an NVIDIA driver.
install -m 0644 "$SRC/contrib/systemd/optimanode.service" "$UNIT_DIR/optimanode.service"
if [ "$NVIDIA" = 1 ] || { [ "$NVIDIA" = auto ] && [ -e /dev/nvidiactl ]; }; then
  install -d -m 0755 "$UNIT_DIR/optimanode.service.d"
  install -m 0644 "$SRC/contrib/systemd/optimanode.service.d/nvidia.conf" "$UNIT_DIR/optimanode.service.d/nvidia.conf"
  say "installed the NVIDIA drop-in"
fi

# 8. Start (or restart onto the new version; journal migrations run on start).
if [ "$START" = 0 ]; then
  say "installed; start it with: systemctl daemon-reload && systemctl enable --now optimanode"
elif [ ! -d /run/systemd/system ]; then
  say "systemd is not running on this machine (a container?): installed, not started"
else
  systemctl daemon-reload
  if systemctl is-active --quiet optimanode; then
    systemctl restart optimanode
    say "restarted optimanode on the new version"
  else
    systemctl enable --now optimanode
    say "enabled and started optimanode"
  fi
  systemctl --no-pager --lines=5 status optimanode || true
fi
cat <<EOF

Next:
  copy .gguf models into $MODELS (then: systemctl reload optimanode, or wait for the next scan)
  check the machine:      sudo -u optimanode $VENV/bin/optimanode doctor --config $ETC/optimanode.toml
  the Gateway's key:      $ETC/access.key
  the certificate to pin: sudo -u optimanode $VENV/bin/optimanode fingerprint --config $ETC/optimanode.toml
  logs:                   journalctl -u optimanode -f
  the journal:            $PREFIX/bin/optimanode-inspect-journal --state-dir $STATE timeline
EOF
