"""Run a command under the seccomp rules the systemd unit asks for, without systemd.

``python tests/sandbox_exec.py [--mdwe] [--syscalls "@system-service ~@privileged"] -- PROGRAM ARGS...``

* ``--syscalls``: what ``SystemCallFilter=@system-service`` + ``SystemCallFilter=~@privileged`` +
  ``SystemCallErrorNumber=EPERM`` install: only the listed system calls are allowed, any other
  fails with EPERM. The groups are expanded from ``systemd-analyze syscall-filter``, i.e. from the
  very systemd that reads the unit.
* ``--mdwe``: what ``MemoryDenyWriteExecute=yes`` installs (systemd's
  ``seccomp_memory_deny_write_execute``): mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect
  adding PROT_EXEC and shmat with SHM_EXEC fail with EPERM.

Filters are loaded through libseccomp (which systemd itself links) after PR_SET_NO_NEW_PRIVS (as
``NoNewPrivileges=yes``), checked to bite (a W+X mapping must fail; a system call left out of the
allow list must fail), then the program is exec'ed: the filters hold for it and every process it
starts, as they would in the unit.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import shutil
import subprocess
import sys

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | 1
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def libseccomp() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def syscall_groups() -> dict[str, list[str]]:
    """``@group`` → its members (system calls and other groups), as this machine's systemd lists them."""
    out = subprocess.run([shutil.which("systemd-analyze") or "systemd-analyze", "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip():
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(m, groups) for m in groups[name]))


def allowed_syscalls(spec: str) -> set[str]:
    groups = syscall_groups()
    allowed: set[str] = set()
    for item in spec.split():
        if item.startswith("~"):
            allowed -= expand(item[1:], groups)
        else:
            allowed |= expand(item, groups)
    return allowed


def load_syscall_filter(lib: ctypes.CDLL, allowed: set[str]) -> None:
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO_EPERM)
    for name in sorted(allowed):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # another architecture's call (e.g. *_time64 on x86-64)
        if lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None) != 0:
            raise SystemExit(f"sandbox_exec: could not allow {name}")
    if lib.seccomp_load(ctx) != 0:
        raise SystemExit("sandbox_exec: seccomp_load failed (syscall filter)")


def load_mdwe(lib: ctypes.CDLL) -> None:
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    for syscall, arg, mask, value in (("mmap", 2, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE),
                                      ("mprotect", 2, PROT_EXEC, PROT_EXEC),
                                      ("pkey_mprotect", 2, PROT_EXEC, PROT_EXEC),
                                      ("shmat", 2, SHM_EXEC, SHM_EXEC)):
        nr = lib.seccomp_syscall_resolve_name(syscall.encode())
        cmp = (ArgCmp * 1)(ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, value))
        if lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, nr, 1, cmp) != 0:
            raise SystemExit(f"sandbox_exec: could not add the {syscall} rule")
    if lib.seccomp_load(ctx) != 0:
        raise SystemExit("sandbox_exec: seccomp_load failed (mdwe)")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sandbox_exec")
    parser.add_argument("--mdwe", action="store_true")
    parser.add_argument("--syscalls", default="")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    lib = libseccomp()
    allowed = allowed_syscalls(args.syscalls) if args.syscalls else None
    ctypes.CDLL(None).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # as NoNewPrivileges=yes; lets us load filters
    # The MDWE filter first: once the allow list is in force, seccomp() itself may be refused.
    if args.mdwe:
        load_mdwe(lib)
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except PermissionError:
            pass
        else:
            raise SystemExit("sandbox_exec: a writable+executable mapping was still allowed")
    if allowed is not None:
        load_syscall_filter(lib, allowed)
        if "chroot" not in allowed:  # the filter bites: a call it leaves out fails with EPERM
            try:
                os.chroot("/")
            except PermissionError:
                pass
            else:
                raise SystemExit("sandbox_exec: chroot() was still allowed")
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
