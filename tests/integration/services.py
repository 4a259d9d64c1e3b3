"""The job service for tests: `narun coordinator` as a real process on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class ServiceProcess:
    """`narun coordinator` on loopback, its log in state_dir.log. `keys`: its --keys DIR;
    `env`: more environment (NARUN_LOG_LEVEL=debug logs `service.vitals`)."""

    def __init__(self, state_dir: Path, slots: int | None = 4, port: int = 0,
                 keys: Path | None = None, env: dict[str, str] | None = None,
                 hosts: str | None = None) -> None:
        self.state_dir, self.slots, self.keys, self.env = state_dir, slots, keys, env or {}
        self.hosts = hosts
        self.log = state_dir.with_suffix(".log")
        self.start(port)

    def start(self, port: int = 0) -> None:
        self.log.write_text("")
        argv = [sys.executable, "-m", "narun.cli", "--log-json", "coordinator", "--listen",
                f"tcp://127.0.0.1:{port}", "--state-dir", str(self.state_dir)]
        argv += ["--slots", str(self.slots)] if self.slots else []
        argv += ["--hosts", self.hosts] if self.hosts else []
        if self.keys is not None:
            argv += ["--keys", str(self.keys)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stderr=log, stdout=subprocess.DEVNULL,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if '"service.listening"' in line:
                    self.endpoint = json.loads(line)["endpoint"]
                    return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise TimeoutError(self.log.read_text())

    def lines(self, event: str) -> list[dict[str, Any]]:
        """The service's log lines of `event` so far, oldest first."""
        return [json.loads(line) for line in self.log.read_text(errors="replace").splitlines()
                if f'"{event}"' in line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)
