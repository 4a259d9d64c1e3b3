"""Actors fail fast and named on misconfiguration, and leave when their coordinator goes
silent; the coordinator refuses an address it cannot listen on."""

from __future__ import annotations

import asyncio
import io
import socket
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from structlog.testing import capture_logs

from narun.errors import ConfigError, WaitTimeout
from narun.events import JsonLinesReporter
from narun.runtime import Actor, Coordinator
from narun.runtime.actor import EXIT_ORPHANED
from protocol import decode, encode, reply

pytestmark = pytest.mark.timeout(30)


class Idle(Actor):
    role = "trainer"

    async def main(self) -> None:
        await asyncio.sleep(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCoordinator:
    """A ROUTER that answers hello (in protocol version `version`) and then, if `echo`,
    each heartbeat."""

    def __init__(self, version: int = 1, echo: bool = True) -> None:
        self.version, self.echo = version, echo
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.task = asyncio.ensure_future(self.serve())

    async def serve(self) -> None:
        while True:
            route, *frames = await self.sock.recv_multipart()
            msg = decode(frames)
            if msg.type == "hello":
                answer = encode(reply(msg, "welcome", role="coordinator", software="x",
                                      heartbeat_interval=0.2))
                if self.version != 1:  # the same message, claiming another version
                    header = msgpack.unpackb(answer[0])
                    answer[0] = msgpack.packb({**header, "v": self.version})
                await self.sock.send_multipart([route, *answer])
            elif msg.type == "heartbeat" and self.echo:
                await self.sock.send_multipart([route, *encode(reply(
                    msg, "heartbeat", role="coordinator", rank=0, step=0, time=0.0))])

    def close(self) -> None:
        self.task.cancel()
        self.ctx.destroy(linger=0)


async def test_a_closed_port_fails_within_the_heartbeat_timeout_naming_it():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    began = time.monotonic()
    with pytest.raises(WaitTimeout, match=f"welcome for trainer 0 from {endpoint}"):
        await Idle(0, endpoint, heartbeat_interval=0.2, heartbeat_timeout=1.5).run()
    assert time.monotonic() - began < 5


async def test_a_coordinator_of_another_protocol_version_is_named():
    fake = FakeCoordinator(version=2)
    try:
        with pytest.raises(WaitTimeout, match="unsupported protocol version 2"):
            await Idle(0, f"tcp://127.0.0.1:{fake.port}", heartbeat_interval=0.2,
                       heartbeat_timeout=1.5).run()
    finally:
        fake.close()


@pytest.mark.parametrize("echo", [True, False])
async def test_an_actor_leaves_when_its_coordinator_stops_echoing(echo):
    fake = FakeCoordinator(echo=echo)
    actor = Idle(0, f"tcp://127.0.0.1:{fake.port}", heartbeat_interval=0.2,
                 heartbeat_timeout=1.0)
    try:
        if echo:  # heard: keeps running until its main ends
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(actor.run(), 3.0)
        else:
            began = time.monotonic()
            assert await actor.run() == EXIT_ORPHANED
            assert time.monotonic() - began < 3.0
    finally:
        fake.close()


class WithWatchdog(Idle):
    """Its background watchdog fails after a moment."""

    async def main(self) -> None:
        async def watchdog() -> None:
            await asyncio.sleep(0.2)
            raise KeyError("the watchdog's own bug")

        self.tasks.spawn(watchdog(), "watchdog")
        await asyncio.sleep(60)


async def test_a_failed_background_task_fails_the_actor():
    fake = FakeCoordinator()
    actor = WithWatchdog(0, f"tcp://127.0.0.1:{fake.port}", heartbeat_interval=0.2,
                         heartbeat_timeout=5.0)
    try:
        began = time.monotonic()
        with capture_logs() as logs, pytest.raises(KeyError, match="the watchdog's own bug"):
            await actor.run()
        assert time.monotonic() - began < 3.0
        failed = [e for e in logs if e["event"] == "runtime.task_failed"]
        assert [e["task"] for e in failed] == ["trainer 0: watchdog"]
    finally:
        fake.close()


class FailsWhenStopped(Idle):
    async def main(self) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("could not save on the way out") from None


async def test_an_orphaned_actor_logs_the_error_its_main_ended_with():
    fake = FakeCoordinator(echo=False)
    actor = FailsWhenStopped(0, f"tcp://127.0.0.1:{fake.port}", heartbeat_interval=0.2,
                             heartbeat_timeout=1.0)
    try:
        with capture_logs() as logs:
            assert await actor.run() == EXIT_ORPHANED
        failed = [e for e in logs if e["event"] == "actor.main_failed"]
        assert len(failed) == 1 and "could not save on the way out" in failed[0]["error"]
    finally:
        fake.close()


def test_the_coordinator_names_a_port_in_use_and_a_foreign_address(make_mlp_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_mlp_config(port=port)
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{port}.*runtime.port"):
            asyncio.run(Coordinator(cfg, JsonLinesReporter(io.StringIO())).run())
    cfg = make_mlp_config(host="192.0.2.1")  # TEST-NET-1: on no host
    with pytest.raises(ConfigError, match="192.0.2.1.*runtime.host"):
        asyncio.run(Coordinator(cfg, JsonLinesReporter(io.StringIO())).run())


@pytest.fixture
def make_mlp_config(tmp_path):
    import numpy as np

    import narun.models  # noqa: F401
    from narun.config import config_from_dict

    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((40, 4), np.float32), y=np.zeros(40, np.int64))

    def make(**runtime):
        return config_from_dict({
            "model": {"name": "mlp", "sizes": [4, 4, 2]},
            "data": {"kind": "arrays", "path": str(path)},
            "training": {"steps": 2, "batch_size": 4, "grad_clip": None,
                         "out_dir": str(tmp_path / "run")},
            "runtime": {"mode": "ps-sync", "workers": 1, **runtime}})
    return make
