"""contrib/install.sh and contrib/uninstall.sh, run for real in a throwaway root.

The throwaway root is an overlay of this machine's ``/``: the real root is the read-only lower layer
and an empty directory under the test's tmp_path the upper one, so every file the scripts write
lands in that directory and nothing on the machine changes. The scripts run unmodified, as root, in
a chroot on the overlay, in a mount and a network namespace of their own (``unshare -mn``): they
create the ``optimanode`` user in the overlay's ``/etc/passwd``, write ``/opt``, ``/etc``, ``/var/lib``,
``/srv`` and the unit, all in the upper layer, and cannot reach the network. The chroot gets an empty
``/run/systemd/system`` (so the scripts take their systemd path) and a stand-in ``systemctl`` first on
``PATH`` that records its arguments; a flag file decides whether ``is-active`` says the service runs.

The virtual environment is built by the script's own pip commands with ``--wheels``: from wheels
repacked out of this checkout's ``.venv`` (the very versions the tests run with, llama-cpp-python's
compiled library included), so there is no network and no llama.cpp build. The one wheel not in
``.venv`` is setuptools>=68 for building OptimaNode (``.venv`` has Python's bundled 65): taken from
pip's cache of built wheels, downloaded only when that has none.

The expected layout is the table "What goes where" in docs/operations.md, parsed here; the
settings file is compared with the one the same page shows. Beyond the table, the test checks that
the scripts write nothing else, and that the installed node runs as the service user:
``optimanode doctor`` passes as ``optimanode`` with the installed settings.

Needs root, ``unshare``, overlayfs over ``/`` and a system ``/usr/bin/python3`` of .venv's version;
skips saying which is missing. About 30 s on 2 cores.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "operations.md"
INSTALL_TIMEOUT_S = 240  # the venv from local wheels: about a minute on a loaded 2-core machine

pytestmark = pytest.mark.timeout(600)


# --- the documented layout -------------------------------------------------------------------------

def documented_layout() -> list[dict[str, str]]:
    """The rows of the "What goes where" table: path, owner, group, mode, uninstall."""
    text = DOC.read_text()
    start = text.index("| path | holds | owner | mode | uninstall.sh |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        path, _holds, owner, mode, uninstall = cells
        user, group = owner.split(":")
        rows.append({"path": path.strip("`"), "user": user, "group": group, "mode": mode,
                     "uninstall": uninstall})
    assert rows, "docs/operations.md: the What goes where table has no rows"
    return rows


def documented_settings() -> dict:
    """The settings file step 5 of the install section shows."""
    lines = DOC.read_text().splitlines()
    step = next(i for i, line in enumerate(lines) if line.startswith("5. writes `/etc/optimanode/optimanode.toml`"))
    block = []
    for line in lines[step + 1:]:
        if line and not line.startswith("       "):
            break
        block.append(line[7:])
    assert any(block), "docs/operations.md: step 5 shows no settings file"
    return tomllib.loads("\n".join(block))


# --- wheels of this checkout's .venv, for an offline install --------------------------------------

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _repack(dist: importlib.metadata.Distribution, dest: Path) -> None:
    """A wheel of an installed distribution, from the files its RECORD lists (console scripts are
    left out: pip writes them again from entry_points.txt)."""
    info = next(p for p in dist.files or [] if p.name == "METADATA" and p.parent.name.endswith(".dist-info"))
    info_dir = str(info.parent)
    tags = [line.split(":", 1)[1].strip().split("-") for line in dist.read_text("WHEEL").splitlines()
            if line.startswith("Tag:")]
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))  # py2.py3-none-any
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(dest / f"{info_dir.removesuffix('.dist-info')}-{tag}.whl", "w", zipfile.ZIP_STORED) as whl:
        for p in dist.files or []:
            name = str(p)
            if name.startswith("..") or "__pycache__" in p.parts or (
                    str(p.parent) == info_dir and p.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            path = Path(dist.locate_file(p))
            if not path.is_file():
                continue
            data = path.read_bytes()
            entry = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            entry.external_attr = (0o100000 | (path.stat().st_mode & 0o777)) << 16
            whl.writestr(entry, data)
            writer.writerow([name, _record_hash(data), len(data)])
        writer.writerow([f"{info_dir}/RECORD", "", ""])
        whl.writestr(f"{info_dir}/RECORD", record.getvalue())


def _runtime_closure() -> list[importlib.metadata.Distribution]:
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [r for r in importlib.metadata.requires("optimanode") or []]
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        seen[key] = dist = importlib.metadata.distribution(req.name)
        todo.extend(dist.requires or [])
    return list(seen.values())


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("wheels")
    for dist in _runtime_closure():
        _repack(dist, dest)
    # setuptools>=68, the build backend pyproject.toml names: from pip's cache of built wheels when it
    # has one (it does after tools/setup), else downloaded once.
    pip = [sys.executable, "-m", "pip"]
    cached = subprocess.run([*pip, "cache", "list", "--format=abspath", "setuptools"],
                            capture_output=True, text=True, timeout=60, check=False).stdout.split()
    usable = [Path(p) for p in cached if p.endswith(".whl") and int(Path(p).name.split("-")[1].split(".")[0]) >= 68]
    if usable:
        shutil.copy(usable[0], dest)
        return dest
    out = subprocess.run([*pip, "download", "--quiet", "--only-binary", ":all:", "--no-deps", "--dest", str(dest),
                          "setuptools>=68"], capture_output=True, text=True, timeout=180, check=False)
    if out.returncode != 0:
        pytest.fail(f"no setuptools>=68 wheel for the offline install (pip download failed):\n{out.stderr}")
    return dest


# --- the throwaway root ---------------------------------------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
# tests/test_install.py: a stand-in for systemctl that records its arguments.
echo "$*" >>/tmp/fake/systemctl.log
echo "systemctl (stand-in, nothing done): $*" >&2
case "$1" in is-active) [ -e /tmp/fake/active ] && exit 0; exit 3 ;; esac
exit 0
"""

# Run with the chroot's own Python: stat the paths given on the command line, owners by name as the
# throwaway root's /etc/passwd and /etc/group say.
SNAPSHOT = """
import grp, json, os, pwd, stat, sys
out = {}
for path in sys.argv[1:]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        out[path] = None
        continue
    def name(db, i):
        try:
            return db(i)[0]
        except KeyError:
            return str(i)
    out[path] = {"dir": stat.S_ISDIR(st.st_mode), "mode": "%04o" % stat.S_IMODE(st.st_mode),
                 "user": name(pwd.getpwuid, st.st_uid), "group": name(grp.getgrgid, st.st_gid)}
try:
    out["passwd"] = list(pwd.getpwnam("optimanode"))
except KeyError:
    out["passwd"] = None
try:
    out["group"] = grp.getgrnam("optimanode").gr_name
except KeyError:
    out["group"] = None
print(json.dumps(out))
"""


class ThrowawayRoot:
    def __init__(self, base: Path, layers: Path, wheels: Path) -> None:
        self.upper, self.work = layers / "upper", layers / "work"
        self.root, self.fake = base / "root", base / "fake"
        for d in (self.upper, self.work, self.root, self.fake):
            d.mkdir()
        (self.fake / "systemctl").write_text(FAKE_SYSTEMCTL)
        (self.fake / "systemctl").chmod(0o755)
        (self.fake / "snapshot.py").write_text(SNAPSHOT)
        self.wheels = wheels

    def run(self, command: str, *, umask: str = "022", timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``command`` as root in a chroot on the overlay, with a clean environment like sudo's."""
        r = self.root
        setup = f"""set -eu
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/,upperdir={self.upper},workdir={self.work} {r}
mount -t proc proc {r}/proc
mount --rbind /dev {r}/dev
mount -t tmpfs tmpfs {r}/run
mount -t tmpfs tmpfs {r}/tmp
mkdir -p {r}/run/systemd/system {r}/tmp/fake {r}/tmp/wheels {r}{REPO}
mount --bind {self.fake} {r}/tmp/fake
mount --bind {self.wheels} {r}/tmp/wheels
mount --bind {REPO} {r}{REPO}
mount -o remount,bind,ro {r}{REPO}
exec chroot {r} /usr/bin/env -i HOME=/root LANG=C.UTF-8 PIP_CONFIG_FILE=/dev/null \\
  PATH=/tmp/fake:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
  /bin/sh -c 'umask {umask}; cd {REPO} && '"$1"
"""
        return subprocess.run(["unshare", "-mn", "sh", "-c", setup, "sh", command],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def check(self, command: str, **kw) -> str:
        out = self.run(command, **kw)
        assert out.returncode == 0, f"{command} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        return out.stdout + out.stderr

    def snapshot(self, paths: list[str]) -> dict:
        return json.loads(self.check("/usr/bin/python3 /tmp/fake/snapshot.py " + " ".join(paths)).splitlines()[-1])

    def read(self, path: str) -> str:
        return self.check(f"cat {path}")

    def systemctl_calls(self) -> list[str]:
        log = self.fake / "systemctl.log"
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return calls

    def written(self) -> set[str]:
        """Every path the scripts wrote (or deleted: overlayfs keeps a whiteout), as absolute paths."""
        return {"/" + str(p.relative_to(self.upper)) for p in self.upper.rglob("*")}


def _why_no_throwaway_root(tmp: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount and network namespaces, overlayfs, chroot, useradd)"
    for tool in ("unshare", "chroot", "mount", "useradd", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    # install.sh builds the service's environment from the system's Python; the wheels come from
    # this checkout's .venv, so both must be the same Python version.
    system = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
                            capture_output=True, text=True, timeout=30, check=False).stdout.split()
    if system != [str(v) for v in sys.version_info[:2]]:
        return (f"/usr/bin/python3 is {'.'.join(system) or 'missing'}, the wheels from .venv are for "
                f"{sys.version_info[0]}.{sys.version_info[1]}")
    return None


def _overlay_fails(layers: Path) -> str | None:
    """Why / cannot be overlaid with its upper layer in ``layers``, or None when it can."""
    probe = layers / "probe"
    for d in ("u", "w", "m"):
        (probe / d).mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["unshare", "-mn", "mount", "-t", "overlay", "overlay", "-o",
                          f"lowerdir=/,upperdir={probe}/u,workdir={probe}/w", str(probe / "m")],
                         capture_output=True, text=True, timeout=30, check=False)
    shutil.rmtree(probe)
    if out.returncode == 0:
        return None
    return out.stderr.strip() or f"mount exited {out.returncode}"


@pytest.fixture
def throwaway_root(tmp_path, request) -> ThrowawayRoot:
    why = _why_no_throwaway_root(tmp_path)
    if why:
        pytest.skip(f"no throwaway root for install.sh: {why}")
    layers = tmp_path / "layers"
    layers.mkdir()
    on_disk = _overlay_fails(layers)
    if on_disk:
        # tmp_path's file system cannot hold an upper layer (an overlayfs itself, in a container):
        # a tmpfs can, mounted here for the test's duration.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "optimanode-test-install", str(layers)],
                       check=True, timeout=30)
        request.addfinalizer(lambda: subprocess.run(["umount", "--lazy", str(layers)], check=False, timeout=30))
        on_tmpfs = _overlay_fails(layers)
        if on_tmpfs:
            pytest.skip(f"no throwaway root for install.sh: cannot overlay / in a mount namespace here "
                        f"({on_disk}; on a tmpfs: {on_tmpfs})")
    return ThrowawayRoot(tmp_path, layers, request.getfixturevalue("wheelhouse"))


# --- the tests ------------------------------------------------------------------------------------

# Besides the table, what the scripts may write: the user database (with its backups), the login
# records useradd resets for the new user, pip's cache in root's home, the parent directories.
SYSTEM_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/passwd-", "/etc/group-",
                "/etc/shadow-", "/etc/gshadow-", "/etc/.pwd.lock", "/var/log/lastlog", "/var/log/faillog",
                "/root/.cache/pip")


def _outside(written: set[str], allowed: set[str]) -> set[str]:
    """The paths in ``written`` that are neither an allowed path, inside one, nor a parent of one."""
    return {p for p in written
            if not any(p == a or p.startswith(a + "/") or a.startswith(p + "/") for a in allowed)}


def _expect_layout(root: ThrowawayRoot, rows: list[dict[str, str]], *, after: str = "install") -> None:
    """Each row of the table as it should be ``after`` "install", "uninstall" or "purge" (the table's
    uninstall.sh column): present with its owner and mode, or absent."""
    snap = root.snapshot([r["path"].rstrip("/") for r in rows])
    for row in rows:
        path, column = row["path"].rstrip("/"), row["uninstall"]
        present = (after == "install" or column.startswith("never removed")
                   or (after == "uninstall" and column.startswith("kept")))
        got = snap[path]
        if not present:
            assert got is None, f"{path} is still there after {after} (the doc: {column})"
            continue
        assert got is not None, f"{path} is missing after {after}"
        owner = f"{row['user']}:{row['group']}"
        if after == "purge" and "`--purge` makes it root:root" in column:
            owner = "root:root"
        assert got["dir"] == row["path"].endswith("/"), f"{path}: directory {got['dir']}, the doc says otherwise"
        assert (f"{got['user']}:{got['group']}", got["mode"]) == (owner, row["mode"]), \
            f"{path} after {after}: {got['user']}:{got['group']} {got['mode']}, the doc says {owner} {row['mode']}"


def test_install_and_uninstall_produce_the_layout_the_operations_guide_describes(throwaway_root):
    root = throwaway_root
    rows = documented_layout()
    nvidia = [r for r in rows if r["path"].endswith("/nvidia.conf")]
    plain = [r for r in rows if r not in nvidia]
    assert len(nvidia) == 1

    # A first install, from a root whose umask is hardened: the service must still read /opt.
    out = root.check("contrib/install.sh --skip-apt --no-nvidia --wheels /tmp/wheels", umask="077",
                     timeout=INSTALL_TIMEOUT_S)
    assert "created the system user optimanode" in out and "generated /etc/optimanode/access.key" in out
    _expect_layout(root, plain)
    assert root.snapshot(["/etc/systemd/system/optimanode.service.d"])["/etc/systemd/system/optimanode.service.d"] is None

    snap = root.snapshot([])
    name, _pw, uid, _gid, _gecos, home, shell = snap["passwd"]
    assert (name, home, shell) == ("optimanode", "/var/lib/optimanode", "/usr/sbin/nologin")
    assert 0 < uid < 1000 and snap["group"] == "optimanode", "a system user and group"

    settings = tomllib.loads(root.read("/etc/optimanode/optimanode.toml"))
    assert settings == documented_settings()
    key = root.read("/etc/optimanode/access.key")
    assert re.fullmatch(r"[0-9a-f]{64}\n?", key), "the access key: 64 hex digits"
    assert root.read("/etc/systemd/system/optimanode.service") == (REPO / "contrib/systemd/optimanode.service").read_text()
    assert root.systemctl_calls() == ["daemon-reload", "is-active --quiet optimanode", "enable --now optimanode",
                                      "--no-pager --lines=5 status optimanode"]

    unexpected = _outside(root.written(), {r["path"].rstrip("/") for r in rows} | set(SYSTEM_FILES))
    assert not unexpected, f"install.sh wrote outside the documented layout: {sorted(unexpected)}"

    # The node runs as the service user with what was installed: doctor finds the models directory
    # readable, the state directory writable, the key private and llama-cpp-python importable.
    doctor = root.run("runuser -u optimanode -- /opt/optimanode/venv/bin/optimanode doctor "
                      "--config /etc/optimanode/optimanode.toml", timeout=180)
    assert doctor.returncode == 0, f"doctor as optimanode failed:\n{doctor.stdout}\n{doctor.stderr}"
    for check in ("state", "key", "llama_cpp"):
        assert re.search(rf"^ok\s+{check}\s", doctor.stdout, re.MULTILINE), f"doctor: {check} not ok:\n{doctor.stdout}"
    inspect = root.run("runuser -u optimanode -- /opt/optimanode/bin/optimanode-inspect-journal --help")
    assert inspect.returncode == 0, inspect.stderr
    # Installed from a wheel, not editable from the copy: the journal's migrations are package data
    # in the environment (tests/test_wheel.py checks the wheel itself).
    first = root.check("cd / && /opt/optimanode/venv/bin/python -c "
                       "'import optimanode.journal as j; print(j.DEFAULT_MIGRATIONS / \"0001_initial.sql\")'")
    assert re.fullmatch(r"/opt/optimanode/venv/lib/python3\.\d+/site-packages/optimanode/migrations/0001_initial\.sql",
                        first.strip()), first

    # An upgrade while the service runs: the operator's settings and the key stay, the unit is
    # restarted, and --nvidia adds the drop-in.
    root.check("echo '# edited by the operator' >>/etc/optimanode/optimanode.toml && "
               "echo journal >/var/lib/optimanode/journal.sqlite3 && echo model >/srv/optimanode/models/m.gguf")
    (root.fake / "active").touch()
    out = root.check("contrib/install.sh --skip-apt --nvidia --wheels /tmp/wheels", timeout=INSTALL_TIMEOUT_S)
    assert "created the system user" not in out and "generated" not in out and "wrote /etc" not in out
    assert root.read("/etc/optimanode/optimanode.toml").endswith("# edited by the operator\n")
    assert root.read("/etc/optimanode/access.key") == key
    _expect_layout(root, rows)
    assert root.read("/etc/systemd/system/optimanode.service.d/nvidia.conf") == \
        (REPO / "contrib/systemd/optimanode.service.d/nvidia.conf").read_text()
    assert "restart optimanode" in root.systemctl_calls()

    # Uninstall keeps the journal, the settings, the key, the user and the models.
    out = root.check("contrib/uninstall.sh")
    assert root.systemctl_calls() == ["disable --now optimanode", "daemon-reload", "reset-failed optimanode"]
    _expect_layout(root, rows, after="uninstall")
    assert root.read("/var/lib/optimanode/journal.sqlite3") == "journal\n"
    assert root.read("/etc/optimanode/access.key") == key
    assert root.snapshot([])["passwd"] is not None

    # Uninstall again, with --purge: only the models stay.
    root.check("contrib/uninstall.sh --purge")
    _expect_layout(root, rows, after="purge")
    assert root.read("/srv/optimanode/models/m.gguf") == "model\n"
    snap = root.snapshot([])
    assert snap["passwd"] is None and snap["group"] is None
