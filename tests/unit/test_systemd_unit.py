"""The service files in contrib/ read as files: the systemd unit's settings the node relies on, the launchd plist."""

from __future__ import annotations

import plistlib

from optimanode.config import Settings
from system.test_systemd_unit import DROPIN, INSTALLED_BINARY, REPO, UNIT, parse_unit


def test_the_unit_gives_the_node_what_its_stop_and_restart_rely_on():
    u = parse_unit(UNIT)
    one = {k: v[-1] for k, v in u.items()}
    assert one["Service.Type"] == "notify" and one["Service.NotifyAccess"] == "main"
    assert one["Service.ExecStart"].split()[:2] == [INSTALLED_BINARY, "run"]
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.Restart"] == "on-failure" and one["Service.WatchdogSec"] == "30"
    # The node drains and stops its workers itself; systemd must not SIGTERM them all at once.
    assert one["Service.KillMode"] == "mixed"
    # A worker killed for memory is the node's crash to handle, not the end of the service.
    assert one["Service.OOMPolicy"] == "continue"
    assert one["Service.LimitNOFILE"] == "65536"
    # Room for the default drain, the cancels landing (5 s in Node.drain), the worker stop grace.
    defaults = Settings()
    assert int(one["Service.TimeoutStopSec"]) > defaults.drain_deadline_s + 5 + defaults.restart.stop_grace_s
    assert (one["Service.User"], one["Service.Group"]) == ("optimanode", "optimanode")
    assert one["Service.StateDirectory"] == one["Service.ConfigurationDirectory"] == "optimanode"
    assert one["Service.CapabilityBoundingSet"] == "" and one["Service.NoNewPrivileges"] == "yes"
    assert set(one["Service.RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # ProcSubset=pid hides /proc/meminfo, which memory admission reads (docs/operations.md).
    assert "Service.ProcSubset" not in u
    assert one["Service.MemoryDenyWriteExecute"] == "yes"
    gpu = {k: v[-1] for k, v in parse_unit(UNIT, DROPIN).items()}
    assert gpu["Service.PrivateDevices"] == "no" and gpu["Service.DevicePolicy"] == "closed"
    assert set(parse_unit(DROPIN)["Service.DeviceAllow"]) == {
        "char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"}


def test_the_launchd_plist_runs_the_node_with_its_config_and_restarts_it_on_failure():
    with (REPO / "contrib" / "launchd" / "com.optimagpt.optimanode.plist").open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "com.optimagpt.optimanode"
    assert plist["ProgramArguments"][:2] == [INSTALLED_BINARY, "run"] and "--config" in plist["ProgramArguments"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["UserName"] == "_optimanode"
    assert plist["Umask"] == 0o077
    assert plist["ExitTimeOut"] > Settings().drain_deadline_s + Settings().restart.stop_grace_s
