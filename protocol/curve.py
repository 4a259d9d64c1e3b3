"""CURVE on narun sockets: each side's keys, and who may connect to a server.

Without a ZAP handler, libzmq lets any CURVE client in; the Authenticator is that handler,
with an allow-list of client public keys. ``open_channel`` refuses to open a CURVE server
socket unless an Authenticator runs on the same context, so the list cannot be skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from narun.errors import ConfigError
from protocol.keys import KeyPair

ZAP_DOMAIN = b"narun"

log = structlog.get_logger(__name__)


class Authenticator:
    """Admits a CURVE client to the servers of ``context`` only if its public key (z85) is
    in ``allowed``; any other peer is dropped during the handshake, before any message.

    Start it inside the running event loop, before binding the server sockets:

        with Authenticator(ctx, load_allowed_keys("keys/clients")) as auth:
            server = open_channel(ctx, "router", bind=..., curve=CurveServer(kp, auth))
    """

    def __init__(self, context: zmq.asyncio.Context, allowed: Iterable[bytes]) -> None:
        self.context = context
        self._allowed = {_check_key(k) for k in allowed}
        self._zap: AsyncioAuthenticator | None = None
        self.denied = 0  # handshakes refused so far

    @property
    def running(self) -> bool:
        return self._zap is not None

    def allow(self, key: bytes) -> None:
        """Admit one more client key from the next handshake on. A client refused before
        must open a new connection: libzmq does not retry a refused handshake."""
        self._allowed.add(_check_key(key))

    def start(self) -> None:
        if self._zap is not None:
            return
        zap = AsyncioAuthenticator(self.context)
        zap.start()
        # pyzmq matches the socket's ZAP domain exactly ("*" only stands for an empty one)
        zap.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=self)
        self._zap = zap

    def stop(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by pyzmq's ZAP handler with the client's z85 public key."""
        if key in self._allowed:
            return True
        self.denied += 1
        if self.denied & (self.denied - 1) == 0:  # 1, 2, 4, 8...: a flood can't flood the log
            log.warning("curve.denied", client_key=key.decode("ascii", "replace"),
                        denied=self.denied)
        return False

    def __enter__(self) -> Authenticator:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class CurveServer:
    """The binding side: its own keypair, and the Authenticator holding the allow-list."""

    keypair: KeyPair
    authenticator: Authenticator

    def configure(self, socket: zmq.Socket) -> None:
        auth = self.authenticator
        if not auth.running or auth.context is not socket.context:
            raise ConfigError("a CURVE server socket needs a started Authenticator on the same "
                              "zmq context; without it libzmq admits every client")
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN


@dataclass(frozen=True)
class CurveClient:
    """The connecting side: its own keypair and the server's public key (z85)."""

    keypair: KeyPair
    server_key: bytes

    def configure(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = _check_key(self.server_key)
        socket.curve_publickey = self.keypair.public
        socket.curve_secretkey = self.keypair.secret


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != 40:
        raise ConfigError(f"CURVE public key: expected 40 z85 bytes, got {key!r:.60}")
    return key
