"""`narun serve`: the front of the streaming inference server.

One asyncio process owns the client socket (a ROUTER, CURVE when --keys is given), the
request queue and the streams; `--replicas` worker processes (narun.serve.pool) each run
a continuous-batching Engine and report every decode step as one `tokens` message. The
front turns those into one `token` message per token for each client, as it arrives, then
`done`.

    client --generate--> front --generate(ids)--> worker (Engine, KV cache)
    client <--token...-- front <--tokens/step---- worker
    client <--done------ front

Bounds, so no client can make the server grow: at most `max_batch` streams run on each
replica, at most `max_queue` wait (past that a request is answered `busy` at once), and a
client that is gone or does not read (a send that fails or would block) has its stream
cancelled at the worker's next step. A worker that dies fails its streams with an `error`
naming it and is restarted (narun.serve.pool). SIGTERM stops accepting, lets the streams
in flight finish for `grace` seconds, cancels what is left, and exits 0.

The HTTP endpoint (narun.serve.http) and the ZeroMQ socket are two front ends over one
`submit(request, sink)` / `cancel(handle)` (narun.serve.streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import zmq
import zmq.asyncio

import narun
from narun.errors import ConfigError, DeviceError, ProtocolError
from narun.runtime.hosts import host_port, listen_host
from narun.runtime.sdnotify import Notifier
from narun.runtime.tasks import Background, Shutdown
from narun.serve.pool import Replica, WorkerPool
from narun.serve.streams import ModelInfo, Request, RequestError, Sink, Tokenizer, check_request
from protocol import (
    Authenticator,
    Channel,
    CurveServer,
    Message,
    error_message,
    message,
    reply,
    token_message,
)
from protocol.keys import NodeKeys
from protocol.transport import open_channel
from workers.inference import InferenceSpec

log = structlog.get_logger("narun.serve")

DEFAULT_PORT = 7800


@dataclass(eq=False)
class _Stream:
    handle: int
    sink: Sink
    request: Request
    ids: np.ndarray
    started: float
    decoder: Any
    key: tuple[bytes, int] | None  # a ZeroMQ client's (route, generate id)
    replica: Replica | None = None
    tokens: int = 0
    cancelled: bool = False


@dataclass
class ServeStats:
    served: int = 0      # streams ended with done (any reason)
    failed: int = 0      # streams ended with error (a worker died, the server stopped)
    refused: int = 0     # requests refused before they ran (invalid, busy)
    dropped: int = 0     # streams cancelled because their client was gone or not reading
    by_reason: dict[str, int] = field(default_factory=dict)


class InferenceServer:
    """Serves one checkpoint until SIGTERM (see the module docstring).

    `on_event(event, **fields)` hears what `narun serve --json` prints: `listening` once
    every replica has loaded the model, `worker_lost`, `stopped`.
    """

    def __init__(self, checkpoint: str, listen: str = f"tcp://127.0.0.1:{DEFAULT_PORT}", *,
                 http: str | None = None, replicas: int = 1, max_batch: int = 32,
                 max_queue: int = 256, max_tokens: int | None = None,
                 prefill_chunk: int = 256, keys: NodeKeys | None = None, grace: float = 30.0,
                 blas_threads: int = 1, max_restarts: int = 3, device: str = "cpu",
                 notifier: Notifier | None = None,
                 on_event: Callable[..., None] | None = None, signals: bool = True) -> None:
        from narun.models import load_trained

        for name, value, low in (("--replicas", replicas, 1), ("--max-batch", max_batch, 1),
                                 ("--max-queue", max_queue, 0),
                                 ("--prefill-chunk", prefill_chunk, 1)):
            if value < low:
                raise ConfigError(f"{name}: expected an int >= {low}, got {value}")
        self.listen_host = listen_host(
            listen, DEFAULT_PORT, keys is not None, "a server",
            ": `narun keys generate DIR --name serve`, authorize each client's key in it, "
            "and pass --keys DIR")
        from workers.executor import check_device_here

        if device != "cpu" and not device.startswith("cuda"):
            raise ConfigError(f"--device {device}: narun serve runs on cpu or cuda:N")
        try:  # no CuPy, no such GPU: said here, as a usage error, not by a dying worker
            check_device_here(device)
        except DeviceError as exc:
            raise ConfigError(f"--device {device}: {exc}") from None
        trained = load_trained(checkpoint)  # refuses a bad checkpoint before any worker runs
        model = trained.model
        if not hasattr(model, "generate_stream"):
            raise ConfigError(f"{checkpoint}: holds a {trained.config.model.name!r} model, "
                              f"which does not generate text; serve a language model's "
                              f"checkpoint (model.name: gpt)")
        # every streamed token is decoded with the byte tokenizer: an id past its 256
        # entries raised IndexError in the workers' message loop, which stopped the server
        tokens = Tokenizer().inner.vocab_size
        if model.config.vocab_size > tokens:
            raise ConfigError(f"{checkpoint}: the model has a vocabulary of "
                              f"{model.config.vocab_size} tokens, and narun serve decodes "
                              f"with the byte tokenizer's {tokens}; serve a byte-level model "
                              f"(model.vocab_size <= {tokens})")
        context = model.config.block_size
        if max_tokens is not None and not 1 <= max_tokens < context:
            raise ConfigError(f"--max-tokens: expected 1 .. {context - 1} (the model's context "
                              f"is {context}), got {max_tokens}")
        self.info = ModelInfo(name=_model_name(checkpoint), vocab_size=model.config.vocab_size,
                              context=context, max_tokens=max_tokens or context - 1)
        self.checkpoint = str(trained.checkpoint)  # workers load what was checked here
        del trained, model
        self.tokenizer = Tokenizer()
        self.listen, self.http = listen, http
        self.replicas, self.max_batch, self.max_queue = replicas, max_batch, max_queue
        self.prefill_chunk, self.device, self.blas_threads = prefill_chunk, device, blas_threads
        self.max_restarts, self.keys, self.grace = max_restarts, keys, grace
        self.notifier = notifier or Notifier()
        self.on_event = on_event or (lambda event, **fields: None)
        self.signals = signals  # SIGTERM and SIGINT drain (off for a server inside a test)
        self.accepting = False
        self.endpoint = ""
        self.http_address = ""
        self.stats = ServeStats()
        self.pool: WorkerPool | None = None
        self._streams: dict[int, _Stream] = {}
        self._queue: deque[_Stream] = deque()
        self._by_client: dict[tuple[bytes, int], int] = {}
        self._handles = itertools.count(1)
        self._public: Channel | None = None
        self._internal: Channel | None = None
        self._shutdown = Shutdown()
        self._tasks = Background("inference server", on_error=self._shutdown.fail)
        self._idle = asyncio.Event()  # set while no stream is queued or running
        self._idle.set()
        self._dispatching = False

    # -- what front ends call ------------------------------------------------------------
    def submit(self, request: Request, sink: Sink, key: tuple[bytes, int] | None = None) -> int:
        """Queue a stream; its events go to `sink`. RequestError when it cannot run."""
        try:
            if not self.accepting:
                raise RequestError("busy", "this server is stopping; send the request to "
                                           "another server")
            ids = check_request(request, self.info, self.tokenizer)
            # one a free slot takes at once does not wait: --max-queue 0 means no waiting,
            # and comparing the queue alone (0 >= 0) refused every request as busy
            if len(self._queue) >= self.max_queue and not self._free_replicas():
                raise RequestError("busy", f"the queue is full ({self.max_queue} requests "
                                           f"wait for a slot); retry later, or start the "
                                           f"server with more --replicas or a larger "
                                           f"--max-queue")
        except RequestError:
            self.stats.refused += 1
            raise
        stream = _Stream(next(self._handles), sink, request, ids, time.monotonic(),
                         self.tokenizer.decoder(), key)
        self._streams[stream.handle] = stream
        if key is not None:
            self._by_client[key] = stream.handle
        self._queue.append(stream)
        self._idle.clear()
        self._dispatch()
        return stream.handle

    def _free_replicas(self) -> list[Any]:
        """The ready replicas with a slot for one more stream."""
        if self.pool is None:
            return []
        return [r for r in self.pool.replicas if r.ready and r.load < self.max_batch]

    def cancel(self, handle: int) -> None:
        """End a stream with done `cancelled` (at once if queued, else at the worker's next
        step); nothing when it already ended."""
        s = self._streams.get(handle)
        if s is None or s.cancelled:
            return
        s.cancelled = True
        if s.replica is None:
            self._queue.remove(s)
            self._end(s, "cancelled")
        elif self._internal is not None:
            self._internal.try_send(message("abort", handle, reason="cancelled"),
                                    to=s.replica.route)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> int:
        context = zmq.asyncio.Context()
        if self.signals:
            self._shutdown.on_signals(asyncio.get_running_loop())
        sockets = tempfile.mkdtemp(prefix="narun-serve-")  # 0700: only we reach the workers
        auth = http_server = None
        try:
            self._internal = open_channel(context, "router", bind=f"ipc://{sockets}/workers")
            self._tasks.spawn(self._worker_loop(self._internal), "workers' messages")
            spec = InferenceSpec(self.checkpoint, self._internal.endpoint, self.max_batch,
                                 self.prefill_chunk, self.device)
            self.pool = WorkerPool(spec, self.replicas, self.blas_threads, self.max_restarts,
                                   on_ready=lambda r: self._dispatch(),
                                   on_lost=self._replica_lost)
            await self.pool.start()
            self._tasks.spawn(self.pool.failed(), "inference workers")
            curve = None
            if self.keys is not None:
                auth = Authenticator(context, self.keys.authorized.values())
                auth.start()
                curve = CurveServer(self.keys.keypair, auth)
            self._public = open_channel(context, "router", bind=self.listen, curve=curve)
            self.endpoint = self._public.endpoint
            if self.http is not None:
                from narun.serve.http import serve_http

                host, port = host_port(self.http, 8000, "--http")
                http_server = await serve_http(self, host, port)
                self.http_address = "http://{}:{}".format(
                    *http_server.sockets[0].getsockname()[:2])
            self.accepting = True
            self._tasks.spawn(self._client_loop(self._public), "clients' messages")
            self._tasks.spawn(self.notifier.run_watchdog(), "systemd watchdog")
            log.info("serve.listening", endpoint=self.endpoint, http=self.http_address or None,
                     replicas=self.replicas, max_batch=self.max_batch, model=self.info.name)
            self.on_event("listening", endpoint=self.endpoint, http=self.http_address or None,
                          model=self.info.name, replicas=self.replicas,
                          max_batch=self.max_batch, max_queue=self.max_queue,
                          context=self.info.context, max_tokens=self.info.max_tokens)
            self.notifier.ready(f"serving {self.info.name} on {self.endpoint}")
            await self._shutdown.wait()
            self.notifier.stopping(f"finishing {self.in_flight} stream(s)")
            if http_server is not None:
                http_server.close()  # no new connections; open ones finish their streams
            await self._drain()
            self.on_event("stopped", served=self.stats.served, failed=self.stats.failed,
                          refused=self.stats.refused, dropped=self.stats.dropped,
                          garbage=self._public.refused,
                          denied=auth.denied if auth is not None else 0)
            return 0
        finally:
            self.accepting = False
            self._tasks.cancel()
            if self._streams:  # the server failed (a drain ends them all): say so to each,
                # or a queued stream's client waits for tokens until its own timeout
                self._dispatching = True  # and hand nothing more to the workers
                why = self._shutdown.failure or "stopped"
                for s in list(self._streams.values()):
                    self._fail_stream(s, "internal", f"the inference server failed ({why}) "
                                                     f"before this stream ended; resend the "
                                                     f"request once it is back")
            if http_server is not None:
                await http_server.wait_closed()
            if self.pool is not None:
                await self.pool.stop()
            for ch in (self._public, self._internal):
                if ch is not None:
                    ch.close()
            if auth is not None:
                auth.stop()
            context.destroy(linger=0)
            shutil.rmtree(sockets, ignore_errors=True)
            self.notifier.close()

    def stop(self) -> None:
        self._shutdown.stop()

    async def _drain(self) -> None:
        self.accepting = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await self._idle.wait()
        for handle in list(self._streams):
            self.cancel(handle)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):  # the workers' next step reports them
                await self._idle.wait()
        for s in list(self._streams.values()):  # a worker that did not answer
            self._fail_stream(s, "cancelled", "the server stopped before this stream ended")

    # -- the two sockets -----------------------------------------------------------------
    async def _client_loop(self, channel: Channel) -> None:
        while True:
            incoming = await channel.recv()
            msg, route = incoming.msg, incoming.route
            assert route is not None
            answer = self._on_client(msg, route)
            if answer is not None:
                channel.try_send(answer, to=route)  # one that does not read loses it

    def _on_client(self, msg: Message, route: bytes) -> Message | None:
        if msg.type == "generate":
            key = (route, msg.id)
            if key in self._by_client:
                return error_message(msg.id, "invalid", f"id {msg.id} is streaming already "
                                                        f"on this connection; use a new id")
            request = Request(prompt=msg.get("prompt"), text=msg.get("text"),
                              max_tokens=msg["max_tokens"], temperature=msg["temperature"],
                              top_k=msg["top_k"], seed=msg["seed"],
                              stop=tuple(msg.get("stop") or ()))
            assert self._public is not None
            try:
                self.submit(request, _ZmqSink(self._public, route, msg.id), key)
            except RequestError as exc:
                return error_message(msg.id, exc.code, exc.message)
            return None
        if msg.type == "abort":
            handle = self._by_client.get((route, msg.id))
            if handle is not None:
                self.cancel(handle)
            return None
        if msg.type == "hello":
            return reply(msg, "welcome", role="inference", software=narun.__version__,
                         heartbeat_interval=0.0)
        return error_message(msg.id, "unsupported", f"an inference server does not handle "
                                                    f"{msg.type}; send generate or abort")

    async def _worker_loop(self, channel: Channel) -> None:
        while True:
            incoming = await channel.recv()
            msg, route = incoming.msg, incoming.route
            if msg.type == "tokens":
                self._on_tokens(msg)
            elif msg.type == "hello":
                assert self.pool is not None
                if self.pool.mark_ready(route) is not None:
                    channel.try_send(reply(msg, "welcome", role="inference",
                                           software=narun.__version__,
                                           heartbeat_interval=0.0), to=route)
            elif msg.type == "error":
                s = self._streams.get(msg.id)
                if s is not None:
                    self._fail_stream(s, msg["code"], msg["message"])
            else:
                log.warning("serve.unexpected", type=msg.type, route=route)

    def _on_tokens(self, msg: Message) -> None:
        token_bytes = self.tokenizer.token_bytes
        for handle, token, logprob, finished in zip(msg["ids"], msg["tokens"],
                                                    msg["logprobs"].tolist(), msg["finished"]):
            s = self._streams.get(handle)
            if s is None:
                continue
            if token >= 0 and not s.cancelled:
                text = s.decoder.decode(token_bytes(token))
                s.tokens += 1
                if not s.sink.token(s.tokens - 1, token, logprob, text) and not finished:
                    self.stats.dropped += 1
                    self.cancel(handle)
            if finished:
                self._end(s, finished)

    # -- streams -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand queued streams to the least loaded ready replicas, as slots allow."""
        if self.pool is None or self._internal is None or self._dispatching:
            return  # a stream failed inside this loop ends through _forget, which calls here
        self._dispatching = True
        try:
            self._hand_out(self._internal)
        finally:
            self._dispatching = False

    def _hand_out(self, internal: Channel) -> None:
        while self._queue:
            free = self._free_replicas()
            if not free:
                return
            r = min(free, key=lambda x: x.load)
            s = self._queue.popleft()
            req = s.request
            fields: dict[str, Any] = {"prompt": s.ids}
            if req.stop:
                fields["stop"] = list(req.stop)
            try:
                sent = internal.try_send(
                    message("generate", s.handle, max_tokens=req.max_tokens,
                            temperature=req.temperature, top_k=req.top_k, seed=req.seed,
                            **fields), to=r.route)
            except ProtocolError as exc:
                # check_request should have refused it; raised from here, the stream was off
                # the queue and stayed in _streams for good (and crashed the drain)
                log.error("serve.unsendable", error=str(exc))
                self._fail_stream(s, "invalid", f"the request cannot be sent to a worker: "
                                                f"{exc}; fix that field and resend it")
                continue
            if not sent:  # the worker is gone (its loss is being handled) or not reading
                self._fail_stream(s, "internal", f"inference worker {r.rank} did not take "
                                                 f"the request; resend it")
                continue
            s.replica = r
            r.streams.add(s.handle)

    def _end(self, s: _Stream, reason: str) -> None:
        self._forget(s)
        self.stats.served += 1
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
        s.sink.done(reason, s.tokens, time.monotonic() - s.started)

    def _fail_stream(self, s: _Stream, code: str, text: str) -> None:
        if s.replica is None and s in self._queue:
            self._queue.remove(s)
        self._forget(s)
        self.stats.failed += 1
        s.sink.error(code, text)

    def _forget(self, s: _Stream) -> None:
        self._streams.pop(s.handle, None)
        if s.key is not None:
            self._by_client.pop(s.key, None)
        if s.replica is not None:
            s.replica.streams.discard(s.handle)
        if not self._streams:
            self._idle.set()
        self._dispatch()

    def _replica_lost(self, r: Replica, why: str) -> None:
        log.error("serve.worker_lost", rank=r.rank, why=why, streams=len(r.streams))
        self.on_event("worker_lost", rank=r.rank, message=why, streams=len(r.streams))
        for handle in list(r.streams):
            s = self._streams.get(handle)
            if s is not None:
                s.replica = None
                self._fail_stream(s, "internal", f"{why} while generating this stream "
                                                 f"({s.tokens} tokens sent); resend the "
                                                 f"request")


class _ZmqSink:
    """A ZeroMQ client's stream: each event is one message, sent now or never (a client
    that does not read loses its stream, not the server's memory)."""

    __slots__ = ("channel", "route", "id")

    def __init__(self, channel: Channel, route: bytes, id_: int) -> None:
        self.channel, self.route, self.id = channel, route, id_

    def token(self, index: int, token: int, logprob: float, text: str) -> bool:
        return self.channel.try_send(token_message(self.id, index, token, logprob, text),
                                     to=self.route)

    def done(self, reason: str, tokens: int, seconds: float) -> None:
        self.channel.try_send(message("done", self.id, reason=reason, tokens=tokens,
                                      seconds=seconds), to=self.route)

    def error(self, code: str, text: str) -> None:
        self.channel.try_send(error_message(self.id, code, text), to=self.route)


def _model_name(checkpoint: str) -> str:
    """What clients call the model: the run's directory name (runs/quickstart ->
    quickstart), or for a step directory the run's name."""
    from pathlib import Path

    p = Path(checkpoint).resolve()
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        p = p.parent.parent
    elif p.name == "checkpoints":
        p = p.parent
    return p.name or "model"


def run_server(server: InferenceServer) -> int:
    import uvloop

    return uvloop.run(server.run())
