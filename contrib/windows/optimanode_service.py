"""OptimaNode as a Windows service, through pywin32's ``win32serviceutil.ServiceFramework``.

UNTESTED: written against pywin32's documented API and never run on Windows by this project; the
only thing checked (tests/system/test_systemd_unit.py) is that it imports cleanly on Linux without pywin32.

Install, from an elevated PowerShell, with the node installed in a virtual environment::

    py -3.11 -m venv C:\\OptimaNode\\venv
    C:\\OptimaNode\\venv\\Scripts\\pip install C:\\path\\to\\optimanode pywin32
    C:\\OptimaNode\\venv\\Scripts\\python C:\\path\\to\\optimanode\\contrib\\windows\\optimanode_service.py --startup auto install
    Start-Service OptimaNode          # Stop-Service / Restart-Service OptimaNode; Get-Service OptimaNode
    # remove: ...\\optimanode_service.py remove

Settings: ``%ProgramData%\\OptimaNode\\optimanode.toml`` (or the file named by OPTIMANODE_CONFIG in
the service's environment); logs (the same structured lines as on Linux) are appended to
``%ProgramData%\\OptimaNode\\optimanode.log``. Windows has no SIGTERM/SIGHUP: the Service Control
Manager's stop request drains and stops the node exactly as SIGTERM does (``Service.request_stop``);
a settings change needs ``Restart-Service OptimaNode``. Workers die with the node through EOF on
their stdin (Windows has no PR_SET_PDEATHSIG).

How it works: ``SvcDoRun`` (the SCM's thread) runs the node's event loop with
``optimanode.service.run_service(install_signals=False)``; ``SvcStop`` hands a stop request to that
loop with ``call_soon_threadsafe`` and reports STOP_PENDING with a wait hint covering the drain.
pywin32 is imported only on Windows, so this module imports anywhere.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

SERVICE_NAME = "OptimaNode"
DISPLAY_NAME = "OptimaNode LLM inference node"
DESCRIPTION = "Serves GGUF models to an OptimaGPT Gateway (llama.cpp workers, SQLite event journal)."


def data_dir() -> Path:
    return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "OptimaNode"


def config_file() -> Path:
    return Path(os.environ.get("OPTIMANODE_CONFIG") or data_dir() / "optimanode.toml")


def run_node(on_started: Any = None) -> int:
    """Run the node until a stop request; the same lifecycle as ``optimanode run`` under systemd."""
    from optimanode.config import load_settings
    from optimanode.service import configure_logging, run_service

    cfg = config_file()
    settings = load_settings(cfg if cfg.exists() else None)
    data_dir().mkdir(parents=True, exist_ok=True)
    with (data_dir() / "optimanode.log").open("a", encoding="utf-8") as log_stream:
        configure_logging(settings, stream=log_stream)  # type: ignore[arg-type]
        return asyncio.run(run_service(settings, lambda: load_settings(cfg if cfg.exists() else None),
                                       install_signals=False, started=on_started))


if sys.platform == "win32":  # pragma: no cover - see the module docstring
    import servicemanager  # type: ignore[import-not-found]
    import win32service  # type: ignore[import-not-found]
    import win32serviceutil  # type: ignore[import-not-found]

    class OptimaNodeService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self._lock = threading.Lock()
            self._service: Any = None
            self._stop_asked = False

        def _started(self, service: Any) -> None:
            with self._lock:
                self._service = service
                if self._stop_asked:  # the SCM said stop before the node existed
                    service.request_stop("service stop")

        def SvcStop(self) -> None:  # noqa: N802 - pywin32's name
            # The wait hint covers the default drain (30 s) plus stopping the workers.
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=60_000)
            with self._lock:
                self._stop_asked = True
                if self._service is not None:
                    self._service.request_stop_threadsafe("service stop")

        def SvcDoRun(self) -> None:  # noqa: N802 - pywin32's name
            servicemanager.LogInfoMsg(f"{SERVICE_NAME}: starting")
            try:
                run_node(self._started)
            except Exception as exc:  # noqa: BLE001 - reported to the event log, then the service stops
                servicemanager.LogErrorMsg(f"{SERVICE_NAME}: {type(exc).__name__}: {exc}")
                raise
            servicemanager.LogInfoMsg(f"{SERVICE_NAME}: stopped")
else:
    OptimaNodeService = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if sys.platform != "win32":
        print("optimanode_service.py is the Windows service; on Linux use contrib/systemd/optimanode.service, "
              "on macOS contrib/launchd/com.optimagpt.optimanode.plist", file=sys.stderr)
        return 2
    if len(argv) == 1:  # started by the Service Control Manager
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(OptimaNodeService)
        servicemanager.StartServiceCtrlDispatcher()
        return 0
    win32serviceutil.HandleCommandLine(OptimaNodeService, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
