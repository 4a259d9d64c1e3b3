"""One job's CURVE key pair: what encrypts and admits the job's own connections across hosts.

The coordinator makes a fresh pair for each run and hands it to every process of the job in
its spec, over the agent's encrypted connection (and to disk only in a mode-0600 file on the
agent's host). Every server socket of the job (the coordinator's control socket, each
shard's) admits only clients holding that pair, so a process of another job, or anyone
else, cannot exchange a single message with it. Jobs on one host (`narun train`) run on
loopback in plaintext and have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from narun.errors import ConfigError
from protocol.curve import Authenticator, CurveClient, CurveServer
from protocol.keys import KeyPair


@dataclass(frozen=True, repr=False)
class JobKeys:
    keypair: KeyPair

    def __repr__(self) -> str:
        return f"JobKeys(public={self.keypair.public.decode()!r})"

    @classmethod
    def new(cls) -> JobKeys:
        public, secret = zmq.curve_keypair()
        return cls(KeyPair(public, secret))

    @classmethod
    def from_spec(cls, data: dict[str, Any] | None) -> JobKeys | None:
        if data is None:
            return None
        try:
            keypair = KeyPair(data["public"].encode("ascii"), data["secret"].encode("ascii"))
        except (KeyError, AttributeError, UnicodeEncodeError):
            raise ConfigError("worker spec: curve: expected {public, secret} z85 text") from None
        if zmq.curve_public(keypair.secret) != keypair.public:
            raise ConfigError("worker spec: curve: the public key does not belong to the secret")
        return cls(keypair)

    def to_spec(self) -> dict[str, str]:
        return {"public": self.keypair.public.decode(), "secret": self.keypair.secret.decode()}

    def authenticator(self, context: zmq.asyncio.Context) -> Authenticator:
        """The allow-list of the job's server sockets on `context` (started: call stop())."""
        auth = Authenticator(context, [self.keypair.public])
        auth.start()
        return auth

    def server(self, authenticator: Authenticator) -> CurveServer:
        return CurveServer(self.keypair, authenticator)

    def client(self) -> CurveClient:
        return CurveClient(self.keypair, self.keypair.public)
