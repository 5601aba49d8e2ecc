#!/usr/bin/env bash
# Remove the OptimaNode service installed by contrib/install.sh. Safe to run again.
# Keeps the journal and state (/var/lib/optimanode), the settings and key (/etc/optimanode), the
# system user and the models unless told otherwise.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: contrib/uninstall.sh [--purge] [--help]

Stops and disables the optimanode service, removes its unit (and drop-ins) and /opt/optimanode.

Kept unless --purge: /var/lib/optimanode (the journal: every model's history and desired state),
/etc/optimanode (settings and the access key the Gateway knows) and the optimanode user and group.
Never removed: the models directory (/srv/optimanode/models or wherever models_dir points);
--purge gives it to the group root, as the optimanode group goes.

  --purge     also remove /var/lib/optimanode, /etc/optimanode and the optimanode user and group
  -h, --help  this text
EOF
}

PURGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf 'uninstall.sh: %s\n' "$*"; }
if [ "$(id -u)" -ne 0 ]; then
  echo "uninstall.sh: run as root (sudo contrib/uninstall.sh)" >&2
  exit 1
fi

UNIT_DIR=/etc/systemd/system
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  # Stopping drains running requests (up to drain_deadline_s) and closes the journal cleanly.
  systemctl disable --now optimanode 2>/dev/null || true
fi
rm -f "$UNIT_DIR/optimanode.service"
rm -rf "$UNIT_DIR/optimanode.service.d"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload
  systemctl reset-failed optimanode 2>/dev/null || true
fi
rm -rf /opt/optimanode
say "removed the service and /opt/optimanode"

if [ "$PURGE" = 1 ]; then
  # The models stay, but not in a group that is about to disappear: a group created later with the
  # same number would be able to read them.
  models=$(sed -n 's/^models_dir *= *"\(.*\)" *$/\1/p' /etc/optimanode/optimanode.toml 2>/dev/null | head -n 1 || true)
  models=${models:-/srv/optimanode/models}
  if [ -d "$models" ] && [ "$(stat -c %G "$models")" = optimanode ]; then
    chgrp root "$models"
    say "kept the models in $models, now group root"
  fi
  rm -rf /var/lib/optimanode /etc/optimanode
  if getent passwd optimanode >/dev/null; then
    userdel optimanode
  fi
  if getent group optimanode >/dev/null; then
    groupdel optimanode
  fi
  say "purged /var/lib/optimanode, /etc/optimanode and the optimanode user"
else
  say "kept /var/lib/optimanode (journal), /etc/optimanode (settings, key) and the optimanode user; --purge removes them"
fi
