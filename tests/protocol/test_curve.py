"""CURVE: an allowed client talks, anyone else gets nothing through, in either direction."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from narun.errors import ConfigError, WaitTimeout
from protocol import (
    Authenticator,
    CurveClient,
    CurveServer,
    generate_keypair,
    load_allowed_keys,
    load_keypair,
    load_public_key,
    message,
    open_channel,
)

LOOPBACK = "tcp://127.0.0.1:0"
HELLO = message("hello", 1, role="trainer", rank=0, software="0.1.0")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """server, allowed client and intruder keypairs; only 'client' is in allowed/."""
    made = {}
    for name in ("server", "client", "intruder"):
        made[name] = generate_keypair(tmp_path / "keys", name)[1]
    generate_keypair(tmp_path / "allowed", "client-copy")  # a second allowed key
    (tmp_path / "allowed" / "client.key").write_text((tmp_path / "keys" / "client.key").read_text())
    made["allowed"] = tmp_path / "allowed"
    return made


async def probe(server, client, timeout: float = 0.5) -> bool:
    """True if a hello from client reaches server and the welcome comes back."""
    try:
        # a refused handshake ends the connection for good, so the send itself may block
        await client.send(HELLO, wait_sent=False, timeout=timeout)
        inc = await server.recv(timeout=timeout)
    except WaitTimeout:
        return False
    await server.send(message("welcome", inc.msg.id, role="coordinator", software="0.1.0",
                              heartbeat_interval=1.0), to=inc.route)
    got = await client.recv(timeout=timeout)
    return got.msg.type == "welcome"


@pytest.mark.timeout(30)
async def test_allowed_client_talks_and_others_get_nothing_through(ctx, keys) -> None:
    server_kp = load_keypair(keys["server"])
    server_key = server_kp.public
    with Authenticator(ctx, load_allowed_keys(keys["allowed"])) as auth:
        server = open_channel(ctx, "router", bind=LOOPBACK, curve=CurveServer(server_kp, auth))
        clients = {
            "allowed": CurveClient(load_keypair(keys["client"]), server_key),
            "intruder": CurveClient(load_keypair(keys["intruder"]), server_key),
            "plain": None,  # no CURVE at all
            "wrong server key": CurveClient(load_keypair(keys["client"]),
                                            load_public_key(keys["intruder"])),
        }
        channels = {name: open_channel(ctx, "dealer", connect=server.endpoint, curve=c)
                    for name, c in clients.items()}
        try:
            # the refused ones first: nothing from them may be queued at the server
            for name in ("intruder", "plain", "wrong server key"):
                assert not await probe(server, channels[name]), name
                with pytest.raises(WaitTimeout):  # and nothing reaches them either
                    await channels[name].recv(timeout=0.1)
            assert auth.denied >= 1  # the intruder's key was asked about and refused
            assert await probe(server, channels["allowed"], timeout=5)
            assert server.refused == 0  # refused peers never even delivered garbage
        finally:
            for ch in channels.values():
                ch.close()
            server.close()


@pytest.mark.timeout(30)
async def test_keys_can_be_allowed_while_serving(ctx, keys) -> None:
    server_kp = load_keypair(keys["server"])
    late = CurveClient(load_keypair(keys["intruder"]), server_kp.public)
    with Authenticator(ctx, []) as auth:
        async with open_channel(ctx, "router", bind=LOOPBACK,
                                curve=CurveServer(server_kp, auth)) as server:
            async with open_channel(ctx, "dealer", connect=server.endpoint, curve=late) as c:
                assert not await probe(server, c, timeout=0.3)
            auth.allow(late.keypair.public)
            # libzmq does not retry a refused handshake: a new connection is needed
            async with open_channel(ctx, "dealer", connect=server.endpoint, curve=late) as c:
                assert await probe(server, c, timeout=5)


async def test_curve_server_requires_a_running_authenticator(ctx, keys) -> None:
    auth = Authenticator(ctx, load_allowed_keys(keys["allowed"]))  # not started
    with pytest.raises(ConfigError, match="needs a started Authenticator"):
        open_channel(ctx, "router", bind=LOOPBACK,
                     curve=CurveServer(load_keypair(keys["server"]), auth))
    other = zmq.asyncio.Context()
    try:
        # started, but on another context
        with Authenticator(other, []) as foreign, \
                pytest.raises(ConfigError, match="on the same zmq context"):
            open_channel(ctx, "router", bind=LOOPBACK,
                         curve=CurveServer(load_keypair(keys["server"]), foreign))
    finally:
        other.destroy(linger=0)
