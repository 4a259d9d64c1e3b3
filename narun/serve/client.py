"""The asyncio client of `narun serve` (exported as narun.client.InferenceClient).

    >>> async with InferenceClient("tcp://127.0.0.1:7800") as client:
    ...     stream = client.generate("Once upon a time", max_tokens=32, temperature=0.8,
    ...                              seed=1, stop=["\\n\\n"])
    ...     async for tok in stream:
    ...         print(tok.text, end="", flush=True)
    ...     print(stream.done)         # Done(reason='stop', tokens=17, seconds=0.21)

Leaving the loop early (break, an exception, a cancelled task) aborts the stream on the
server, so it stops spending a slot on tokens nobody reads.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import zmq
import zmq.asyncio

import narun
from narun.errors import ActorDiedError, NarunError, Refused, RemoteError, WaitTimeout
from narun.runtime.connect import service_channel
from narun.runtime.hosts import tcp_address
from narun.runtime.mailbox import Mailbox, new_id
from protocol import message

DEFAULT_ADDRESS = "tcp://127.0.0.1:7800"


class Token(NamedTuple):
    index: int     # its place among the generated tokens, from 0
    token: int     # the token id
    logprob: float
    text: str      # the text it completed ("" while a character's bytes are incomplete)


@dataclass(frozen=True)
class Done:
    reason: str    # length, stop or cancelled
    tokens: int
    seconds: float


class ServerUnavailable(NarunError):
    """The server did not answer: not running there, or it does not admit our key."""


class GenerationError(NarunError):
    """The server refused or failed a request: `code` is `invalid` (the message names the
    field), `busy` (its queue is full, or it is stopping), `internal` (the worker running
    it died) or `cancelled`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class InferenceClient:
    """An asyncio client of one `narun serve`. `address` defaults to $NARUN_SERVE or
    tcp://127.0.0.1:7800; `keys`: this client's key directory (its pair, and the server's
    public key filed under the server's host in authorized/), needed when the server runs
    with --keys. `timeout`: seconds a stream may go without a message (a queued request
    waits for a slot within it)."""

    def __init__(self, address: str | None = None, keys: str | os.PathLike[str] | None = None,
                 timeout: float = 60.0) -> None:
        self.address = address or os.environ.get("NARUN_SERVE") or DEFAULT_ADDRESS
        if "://" not in self.address:
            self.address = tcp_address(self.address, 7800, "server address")
        self.keys = keys
        self.timeout = timeout
        self._context: zmq.asyncio.Context | None = None
        self._mailbox: Mailbox | None = None

    async def __aenter__(self) -> InferenceClient:
        self._context = zmq.asyncio.Context()
        channel = service_channel(self._context, self.address, self.keys, 7800,
                                  "server address")
        self._mailbox = Mailbox(channel, f"the inference server at {self.address}").start()
        try:
            await self._mailbox.call(message("hello", new_id(), role="client", rank=0,
                                             software=narun.__version__),
                                     timeout=min(self.timeout, 10.0), what="a welcome")
        except (WaitTimeout, ActorDiedError, RemoteError) as exc:
            await self.__aexit__()
            raise ServerUnavailable(f"the inference server at {self.address} did not answer "
                                    f"({exc}); is `narun serve` running there, and does it "
                                    f"admit this client's key?") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._mailbox is not None:
            self._mailbox.close()
            self._mailbox = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def generate(self, prompt: str | Sequence[int] | np.ndarray, *, max_tokens: int = 16,
                 temperature: float = 0.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> Generation:
        """A stream of Tokens for `prompt` (text, or token ids). `temperature` 0 is greedy;
        `seed` (default: random) fixes the sampled tokens; `stop` strings end the stream
        after the tokens that complete one. Iterate it; `.done` is set at its end."""
        assert self._mailbox is not None, "use `async with InferenceClient(...)`"
        fields: dict[str, Any] = {}
        if isinstance(prompt, str):
            fields["text"] = prompt
        else:
            fields["prompt"] = np.asarray(prompt, dtype=np.int64)
        if stop:
            if isinstance(stop, str):
                stop = [stop]
            fields["stop"] = list(stop)
        msg = message("generate", new_id(), max_tokens=max_tokens, temperature=temperature,
                      top_k=top_k, seed=random.getrandbits(63) if seed is None else seed,
                      **fields)
        return Generation(self._mailbox, msg, self.timeout)

    async def complete(self, prompt: str | Sequence[int] | np.ndarray,
                       **options: Any) -> tuple[str, Done]:
        """The whole generated text and how it ended (generate's options)."""
        stream = self.generate(prompt, **options)
        text = "".join([tok.text async for tok in stream])
        assert stream.done is not None
        return text, stream.done


class Generation:
    """One request's stream of Tokens (see InferenceClient.generate)."""

    def __init__(self, mailbox: Mailbox, msg: Any, timeout: float) -> None:
        self._mailbox, self._msg, self._timeout = mailbox, msg, timeout
        self.done: Done | None = None
        self._started = False

    def __aiter__(self) -> AsyncIterator[Token]:
        if self._started:
            raise RuntimeError("a Generation is iterated once; call generate() again")
        self._started = True
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[Token]:
        mailbox, msg = self._mailbox, self._msg
        ended = False  # by done or by the server's error: nothing to abort
        try:
            async for answer in mailbox.stream(msg, timeout=self._timeout,
                                               what="the generated tokens"):
                if answer.type == "token":
                    yield Token(answer["index"], answer["token"], answer["logprob"],
                                answer.get("text") or "")
                elif answer.type == "done":
                    self.done = Done(answer["reason"], answer["tokens"], answer["seconds"])
                    return
        except Refused as exc:
            ended = True
            raise GenerationError(exc.code, str(exc)) from None
        except RemoteError as exc:
            ended = True
            raise GenerationError("internal", str(exc)) from None
        except (WaitTimeout, ActorDiedError) as exc:
            raise ServerUnavailable(str(exc)) from None
        finally:
            if self.done is None and not ended:  # left early: stop the server's work on it
                with contextlib.suppress(Exception):  # the server or socket already gone
                    await mailbox.send(message("abort", msg.id, reason="client stopped "
                                                                        "reading"), timeout=1.0)
