"""The systemd units in systemd/ and scripts/install-systemd, which installs them.

`systemd-analyze verify` only warns (exit status 0) about a misspelled directive or a value
it cannot parse, and ignores the line; so a unit counts as valid only when verify prints
nothing about it. The tests never install anything: the script runs with --dry-run, or as
an unprivileged user to see it refuse.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
SCRIPT = ROOT / "scripts" / "install-systemd"
SERVICES = ["narun-agent.service", "narun-coordinator.service", "narun-serve@.service"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (a key may repeat, like SystemCallFilter=)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(f"{section}.{key}", []).append(value)
    return found


def installed_copy(dest: Path, source: Path = UNITS) -> Path:
    """The units as install-systemd writes them, with a real executable for @NARUN@
    (verify checks that ExecStart's program exists)."""
    dest.mkdir()
    for unit in source.iterdir():
        text = unit.read_text().replace("@NARUN@", sys.executable).replace("@USER@", "narun")
        (dest / unit.name).write_text(text)
    return dest


def verify(unit_dir: Path) -> list[str]:
    """What `systemd-analyze verify` says about our units: empty when they are valid."""
    names = [u.name.replace("@.", "@gpt.") for u in sorted(unit_dir.iterdir())]
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"}
    done = subprocess.run([ANALYZE, "verify", "--man=no", *names], cwd=unit_dir, env=env,
                          capture_output=True, text=True, timeout=30)
    ours = {u.name for u in unit_dir.iterdir()} | {n for n in names if "@gpt." in n}
    said = [line for line in (done.stdout + done.stderr).splitlines()
            if any(name in line for name in ours)]
    if done.returncode != 0 and not said:
        said = [f"exit status {done.returncode}:", *done.stderr.splitlines()]
    return said


@needs_analyze
def test_systemd_analyze_verify_passes_on_every_unit(tmp_path: Path):
    assert verify(installed_copy(tmp_path / "units")) == []


@needs_analyze
@pytest.mark.parametrize(("unit", "line", "broken", "complaint"), [
    ("narun-agent.service", "RestartSec=2s", "RestartSek=2s", "Unknown key 'RestartSek'"),
    ("narun-coordinator.service", "WatchdogSec=30s", "WatchdogSec=thirty",
     "Failed to parse sec value"),
    ("narun-serve@.service", "Type=notify", "Type=notifyy", "Failed to parse service type"),
    ("narun.target", "[Install]", "[Instal]", "Unknown section 'Instal'"),
])
def test_verify_catches_a_broken_unit(tmp_path: Path, unit: str, line: str, broken: str,
                                      complaint: str):
    units = installed_copy(tmp_path / "units")
    text = (units / unit).read_text()
    assert line in text
    (units / unit).write_text(text.replace(line, broken, 1))
    said = verify(units)
    assert any(complaint in s for s in said), said


@needs_analyze
def test_verify_catches_a_missing_executable(tmp_path: Path):
    units = installed_copy(tmp_path / "units")
    agent = units / "narun-agent.service"
    agent.write_text(agent.read_text().replace(sys.executable, str(tmp_path / "no-narun")))
    assert any("is not executable" in s for s in verify(units))


def test_the_services_speak_sd_notify_and_drain_under_a_dedicated_user():
    for name in SERVICES:
        unit = directives((UNITS / name).read_text())
        assert unit["Service.Type"] == ["notify"], name
        assert unit["Service.NotifyAccess"] == ["main"], name
        assert unit["Service.WatchdogSec"] == ["30s"], name
        assert unit["Service.Restart"] == ["on-failure"], name
        assert unit["Service.KillMode"] == ["mixed"], name
        assert unit["Service.User"] == unit["Service.Group"] == ["@USER@"], name
        assert unit["Install.WantedBy"] == ["narun.target"], name
        assert unit["Unit.PartOf"] == ["narun.target"], name
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert unit[f"Service.{key}"] == ["yes"], (name, key)
        assert unit["Service.ProtectSystem"] == ["strict"], name
        # Each would break CUDA or a library that makes executable memory (see the unit).
        for key in ("MemoryDenyWriteExecute", "PrivateDevices", "ProtectClock", "DeviceAllow"):
            assert f"Service.{key}" not in unit, (name, key)
        (start,) = unit["Service.ExecStart"]
        assert start.startswith("@NARUN@ "), name
    target = directives((UNITS / "narun.target").read_text())
    assert target["Install.WantedBy"] == ["multi-user.target"]


def test_the_install_script_fills_in_every_placeholder_the_units_use():
    used = set()
    for unit in UNITS.iterdir():
        used |= set(re.findall(r"@[A-Z]+@", unit.read_text()))
    assert used == {"@NARUN@", "@USER@"}
    script = SCRIPT.read_text()
    assert all(f"s|{token}|" in script for token in used)


@functools.cache
def script_root() -> Path:
    """The checkout install-systemd runs from. Dropped to nobody, it must be able to read
    it, which a clone in a mode-0700 directory (mktemp -d, as CI makes) does not allow:
    then a world-readable copy of what the script reads (itself and systemd/) stands in."""
    if os.getuid() != 0:
        return ROOT
    stage = Path(tempfile.mkdtemp(prefix="narun-install-systemd-"))
    stage.chmod(0o755)
    shutil.copytree(UNITS, stage / "systemd")
    (stage / "scripts").mkdir(mode=0o755)
    shutil.copy2(SCRIPT, stage / "scripts" / SCRIPT.name)
    atexit.register(shutil.rmtree, stage, True)
    return stage


def script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run install-systemd as an unprivileged user even when the tests run as root, so that
    a broken --dry-run or root check cannot install anything on this machine."""
    command = [str(script_root() / "scripts" / SCRIPT.name), *args]
    if os.getuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, and setpriv (util-linux) is missing to drop root")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return script("--dry-run", "--prefix", str(tmp_path / "opt"),
                  "--unit-dir", str(tmp_path / "units"), *args)


def test_install_dry_run_prints_each_unit_and_its_exec_start(tmp_path: Path):
    done = dry_run(tmp_path, "--user", "trainer")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    narun = tmp_path / "opt" / "venv" / "bin" / "narun"
    for name in [*SERVICES, "narun.target"]:
        assert f"would: install unit {tmp_path / 'units' / name}\n" in out
    assert (f"ExecStart={narun} agent --listen tcp://0.0.0.0:7600 --keys /etc/narun/keys "
            f"--state-dir /var/lib/narun/agent\n") in out
    assert (f"ExecStart={narun} coordinator --listen tcp://0.0.0.0:7700 --keys "
            f"/etc/narun/keys --state-dir /var/lib/narun/coordinator\n") in out
    assert f"ExecStart={narun} serve /var/lib/narun/models/%i " in out
    assert "@NARUN@" not in out
    assert f"would: python3 -m venv {tmp_path / 'opt' / 'venv'}" in out
    assert f"-m pip install --quiet --upgrade {script_root()}" in out
    try:
        pwd.getpwnam("trainer")
        assert "would: user trainer exists, keeping it\n" in out
    except KeyError:
        assert re.search(r"^would: useradd --system .* trainer $", out, re.M), out
    assert ("would: systemctl daemon-reload" in out) == Path("/run/systemd/system").is_dir()
    assert list(tmp_path.iterdir()) == []  # a dry run creates nothing


def test_install_rejects_arguments_it_cannot_put_into_a_unit():
    for args, complaint in [(["--prefix", "opt/narun"], "--prefix 'opt/narun': expected an "
                             "absolute path"),
                            (["--prefix", "/opt/my narun"], "--prefix '/opt/my narun'"),
                            (["--prefix", "/opt/100%"], "--prefix '/opt/100%'"),
                            (["--prefix", "/home/ada/narun"], "ProtectHome=yes"),
                            (["--user", "Narun Service"], "--user 'Narun Service'"),
                            (["--frobnicate"], "unknown argument '--frobnicate'")]:
        done = script("--dry-run", *args)
        assert done.returncode == 2 and complaint in done.stderr, (args, done.stderr)


def test_install_refuses_to_run_as_a_normal_user(tmp_path: Path):
    done = script("--prefix", str(tmp_path / "opt"), "--unit-dir", str(tmp_path / "units"))
    assert done.returncode == 1
    assert "install-systemd: must run as root" in done.stderr
    assert "--dry-run" in done.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "units").exists()
