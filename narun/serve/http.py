"""The OpenAI-compatible HTTP endpoint of `narun serve --http`: legacy completions, plain or
streamed as server-sent events, for curl and the official `openai` package unchanged.

    >>> http = await serve_http(server, "127.0.0.1", 8000)    # POST /v1/completions,
    >>> http.close(); await http.wait_closed()                 # GET /v1/models, /health

The failure model, before any code. A connection is one asyncio task; h11 parses HTTP/1.1
(keep-alive, chunked bodies, pipelined requests answered in order). A client gets `timeout`
seconds to send each whole request, an idle keep-alive connection as well; then it is
closed. A request head over 16 KiB gets 431, a body over 1 MiB 413, bytes that are not HTTP
400: each closes that connection only. While a completion runs, the connection keeps
reading: end of file or a reset means the client left, and its stream is cancelled at once
(`server.cancel`), as it is whenever the reply ends before the server's stream does (a
stop string seen in the text, a write that failed). A streaming client that stops reading
lets at most `max_buffered` bytes pile up in the transport; past that `Sink.token` returns
False, the server cancels the stream and the connection is dropped. Nothing outlives the
connection's task: the stream is cancelled, the reading task is cancelled and awaited.

What the server object must offer (narun.serve.streams): `info` (ModelInfo), `tokenizer`
(Tokenizer), `submit(Request, Sink) -> handle` raising RequestError("invalid" | "busy"),
`cancel(handle)`, and `accepting` (False while draining: new completions get 503).

Returned text never holds a stop string, as OpenAI documents: the server sends the stop
sequence's tokens too, so text that could begin a stop string is held back until it cannot,
and a matched stop string is cut with what follows. `logprobs` (any int >= 0) gives each
generated token's log-probability, stop tokens included; `top_logprobs` is null (the
server reports the chosen token only) and `text_offset` counts from the completion's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import numpy as np
import structlog

from narun.serve.streams import MAX_STOPS, Request, RequestError, Tokenizer

__all__ = ["HTTPEndpoint", "serve_http"]

log = structlog.get_logger("narun.serve")

MAX_HEAD = 16 * 1024  # request line and headers; an OpenAI client sends well under 1 KiB
MAX_BODY = 1024 * 1024  # a JSON completion request; a prompt beyond the context is refused
TIMEOUT = 10.0  # seconds a client gets to send a request, and to take a reply's last bytes
MAX_BUFFERED = 1024 * 1024  # bytes of stream a client that stops reading may leave unread
READ_SIZE = 64 * 1024

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
_ROUTES = {b"/v1/completions": b"POST", b"/v1/models": b"GET", b"/health": b"GET"}
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          431: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}


class _HTTPError(Exception):
    """A reply in OpenAI's error shape; `param` names the offending field, if one did."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES[self.status],
                          "param": self.param, "code": self.code}}


# -- the request's JSON --------------------------------------------------------------------

@dataclass(frozen=True)
class _Completion:
    """What a /v1/completions body asks for: the server's Request, and how to reply."""

    request: Request
    stream: bool
    include_usage: bool
    logprobs: bool


# What OpenAI clients may send with a value this server cannot honour, and the one it can.
_ONLY = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0,
         "frequency_penalty": 0}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stream", "stream_options", "logprobs", "user", *_ONLY}


def _parse_completion(body: bytes, model: str) -> _Completion:
    """The Request a `/v1/completions` body asks for, or _HTTPError(400 | 404) naming the
    field that is wrong and what would be right. Range checks against the model are
    check_request's, which the server runs on submit."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        # RecursionError: arrays nested ~100 000 deep, which fit in the body's bound
        raise _HTTPError(400, f"the request body is not valid JSON ({e}); send a JSON "
                              f"object such as {{\"prompt\": \"Once\", \"max_tokens\": 16}}"
                         ) from None
    if not isinstance(doc, dict):
        raise _HTTPError(400, f"the request body must be a JSON object, got "
                              f"{type(doc).__name__}")
    unknown = sorted(set(doc) - _KNOWN)
    if unknown:
        raise _HTTPError(400, f"unknown field {unknown[0]!r}; this server accepts "
                              f"{', '.join(sorted(_KNOWN))}", unknown[0])
    if doc.get("model") is not None and doc["model"] != model:
        raise _HTTPError(404, f"the model {doc['model']!r} does not exist here; this server "
                              f"serves {model!r}", "model", "model_not_found")
    for key, only in _ONLY.items():
        if doc.get(key) is not None and doc[key] != only:
            raise _HTTPError(400, f"{key}={doc[key]!r} is not supported; leave it out or "
                                  f"send {json.dumps(only)}", key, "unsupported_value")
    if doc.get("top_p") not in (None, 1, 1.0):
        raise _HTTPError(400, f"top_p={doc['top_p']!r} is not supported (nucleus sampling "
                              f"is not implemented); leave it out or send 1, and use "
                              f"top_k to limit sampling", "top_p", "unsupported_value")
    text, ids = _prompt(doc.get("prompt"))
    stop = doc.get("stop")
    # checked before tuple(), which raised TypeError (a 500) on a number or a bool
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if not (stop is None or isinstance(stop, (str, list))) or len(stops) > MAX_STOPS:
        raise _HTTPError(400, f"stop must be a string or a list of at most {MAX_STOPS} "
                              f"strings, got {stop!r}", "stop")
    stream = _flag(doc, "stream")
    options = doc.get("stream_options")
    if options is not None and not (stream and isinstance(options, dict)
                                    and set(options) <= {"include_usage"}):
        raise _HTTPError(400, "stream_options is only for stream: true, and may only hold "
                              "include_usage", "stream_options")
    logprobs = doc.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or logprobs < 0):
        raise _HTTPError(400, f"logprobs must be null or an int >= 0, got {logprobs!r}",
                         "logprobs")
    seed = doc.get("seed")
    request = Request(
        prompt=ids, text=text, stop=stops,
        max_tokens=_or(doc, "max_tokens", 16),
        temperature=_or(doc, "temperature", 1.0),  # OpenAI's default; 0 is greedy
        top_k=0 if doc.get("top_k") in (None, -1) else doc["top_k"],  # vLLM: -1 no limit
        seed=secrets.randbits(63) if seed is None else seed)
    return _Completion(request, stream, _flag(options or {}, "include_usage"),
                       logprobs is not None)


def _prompt(prompt: Any) -> tuple[str | None, np.ndarray | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                        for t in prompt):
        try:
            return None, np.asarray(prompt, dtype=np.int64)
        except OverflowError:
            raise _HTTPError(400, "prompt holds a token id beyond int64; token ids are "
                                  "0 to the vocabulary size - 1", "prompt") from None
    if isinstance(prompt, list):
        raise _HTTPError(400, "prompt is a list of prompts; this server takes one prompt per "
                              "request (a string, or a list of token ids): send one request "
                              "for each", "prompt")
    raise _HTTPError(400, f"prompt must be a string or a list of token ids, got "
                          f"{json.dumps(prompt)[:80]}", "prompt")


def _or(doc: dict[str, Any], key: str, default: Any) -> Any:
    return default if doc.get(key) is None else doc[key]


def _flag(doc: dict[str, Any], key: str) -> bool:
    value = _or(doc, key, False)
    if not isinstance(value, bool):
        raise _HTTPError(400, f"{key} must be true or false, got {value!r}", key)
    return value


# -- one completion's text: decoding, and stop strings held back -------------------------

@dataclass(eq=False)
class _Output:
    """The sink of one completion. Decodes each token with the tokenizer's incremental
    decoder (a byte token may be half a character), releases the text that cannot begin a
    stop string, and calls `on_piece(text, token_index)` for each token, text "" when it
    released none (a stream writes its event there; False: the client cannot take it, and
    the server cancels the stream). `ended` is set once the reply's content is known: the
    server's done or error, or a stop string in the text (then `tail` is what done released
    last and `reason` the finish reason, or `failure` the server's error)."""

    tokenizer: Tokenizer
    stops: tuple[str, ...]
    on_piece: Callable[[str, int], bool] = lambda text, index: True  # collect only
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    pieces: list[str] = field(default_factory=list)  # the text released by tokens
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # where each token's text begins
    reason: str | None = None  # the finish reason, once known
    failure: tuple[str, str] | None = None  # the server's (code, message)
    tail: str = ""  # text released at the end
    server_done: bool = False  # the server ended the stream: cancelling it is moot

    def __post_init__(self) -> None:
        self._decoder = self.tokenizer.decoder()
        self._held = ""  # decoded text that may be the start of a stop string
        self._decoded = 0  # characters decoded so far

    def token(self, index: int, token: int, logprob: float, text: str) -> bool:
        # `text` is the server's own decoding; decoding here as well gives done() a final
        # flush (a trailing half character becomes U+FFFD, as GPT.generate's bytes decode).
        if self.ended.is_set():
            return True  # past a stop string: the server's done follows
        piece = self._decoder.decode(self.tokenizer.token_bytes(token))
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.offsets.append(self._decoded)
        self._decoded += len(piece)
        released = self._release(piece)
        self.pieces.append(released)
        ok = self.on_piece(released, len(self.tokens) - 1)
        if self.reason == "stop":
            self.ended.set()
        return ok

    def done(self, reason: str, tokens: int, seconds: float) -> None:
        self.server_done = True
        if self.ended.is_set():
            return
        released = self._release(self._decoder.decode(b"", final=True))
        self.tail = released if self.reason == "stop" else released + self._held
        self.reason = self.reason or reason
        self.ended.set()

    def error(self, code: str, message: str) -> None:
        self.server_done = True
        if not self.ended.is_set():
            self.failure = (code, message)
            self.ended.set()

    def _release(self, piece: str) -> str:
        """The text now known not to be (the start of) a stop string."""
        held = self._held + piece
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held, self.reason = "", "stop"
            return held[:min(found)]
        # a prefix longer than the held text cannot be its suffix: trying every length of
        # a long stop string cost ~0.3 s per token for 250 000 characters, on the loop
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(held) + 1))
                    if held.endswith(s[:k])), default=0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def logprobs_object(self, at: slice) -> dict[str, Any]:
        tokens = self.tokens[at]
        return {"tokens": [_token_text(self.tokenizer.token_bytes(t)) for t in tokens],
                "token_logprobs": self.logprobs[at], "top_logprobs": None,
                "text_offset": self.offsets[at]}


def _token_text(raw: bytes) -> str:
    """A token as OpenAI shows one that is not whole UTF-8: `bytes:\\xe2\\x80`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# -- connections ---------------------------------------------------------------------------

class HTTPEndpoint:
    """The listening socket and the connections of one `serve_http`. `close()` stops
    taking connections; `await wait_closed()` then ends the connections still open and
    waits for their tasks, so none outlives the server's event loop: an idle keep-alive
    one at once, one in the middle of a request after its reply (at most `timeout` s)."""

    def __init__(self, server: asyncio.Server,
                 connections: dict[asyncio.Task[Any], _Connection], timeout: float) -> None:
        self.server, self.connections, self.timeout = server, connections, timeout

    @property
    def sockets(self) -> Any:
        return self.server.sockets

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        self.server.close()
        # A drained server has ended every stream, but a connection whose stream ended in
        # the drain's last step has not yet written its reply (its task wakes a few loop
        # turns later): cancelling it now would cut that reply short.
        busy = [asyncio.create_task(c.idle.wait()) for c in self.connections.values()
                 if not c.idle.is_set()]
        if busy:
            await asyncio.wait(busy, timeout=self.timeout)
            for waiter in busy:
                waiter.cancel()
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_http(server: Any, host: str, port: int, *, timeout: float = TIMEOUT,
                     max_buffered: int = MAX_BUFFERED) -> HTTPEndpoint:
    """Serve `server` (see the module docstring) over HTTP/1.1 on host:port (0: any free
    port; the bound one is `http.sockets[0].getsockname()[1]`)."""
    created = int(time.time())
    connections: dict[asyncio.Task[Any], _Connection] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(server, reader, writer, created, timeout, max_buffered)
        connections[task] = connection
        try:
            await connection.run()
        finally:
            connections.pop(task, None)

    return HTTPEndpoint(await asyncio.start_server(handle, host, port), connections, timeout)


class _Gone(Exception):
    """The client left, or stopped reading: drop the connection without a reply."""


class _Connection:
    def __init__(self, server: Any, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, created: int, timeout: float,
                 max_buffered: int) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.created, self.timeout, self.max_buffered = created, timeout, max_buffered
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.overflowed = False  # a stream's client stopped reading
        self.idle = asyncio.Event()  # clear from a request's head to the end of its reply
        self.idle.set()

    async def run(self) -> None:
        try:
            while await self._one_request():
                self.h11.start_next_cycle()
        except (_Gone, ConnectionError, TimeoutError):
            # A plain close would keep the socket until its unread reply drained: maybe never.
            self.writer.transport.abort()
        except Exception:
            log.exception("http connection failed")
            self.writer.transport.abort()
        finally:
            self.writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(self.writer.wait_closed(), self.timeout)

    async def _one_request(self) -> bool:
        """Read one request and answer it; True to keep the connection for another."""
        request = None
        try:
            async with asyncio.timeout(self.timeout):
                request = await self._read_head()
                if request is None:
                    return False  # closed between requests
                self.idle.clear()
                body = await self._read_body(request)
            await self._route(request, body)
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint if e.error_status_hint in _REASONS else 400
            await self._reply(_HTTPError(status, f"malformed HTTP request: {e}; send "
                                                 f"HTTP/1.1 with at most {MAX_HEAD} bytes "
                                                 f"of headers").body(), status, close=True)
        except _HTTPError as e:
            # an unread body leaves nothing to resync on; an oversized head, no trust
            close = self.h11.their_state is not h11.DONE or e.status in (413, 431)
            await self._reply(e.body(), e.status, close=close,
                              allow=_ROUTES.get(_path(request)) if e.status == 405 else None)
        except TimeoutError:
            return False  # silent or slow client: close without a word, as uvicorn does
        except Exception:
            if self.h11.our_state is not h11.SEND_RESPONSE:
                raise  # mid-reply: nothing to say; run() drops the connection
            log.exception("http request failed", target=_path(request).decode(errors="replace"))
            await self._reply(_HTTPError(500, "the server failed to answer this request (a bug: "
                                              "its log has the traceback); retry, and report "
                                              "it if it persists").body(), 500, close=True)
        finally:
            self.idle.set()
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.reader.read(READ_SIZE))

    async def _read_head(self) -> h11.Request | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)  # h11: a server's first event is a Request
        # h11 bounds a head still arriving; one that came whole in a read is measured here
        size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4
                                                           for k, v in event.headers)
        if size > MAX_HEAD:
            raise _HTTPError(431, f"the request head has about {size} bytes; at most "
                                  f"{MAX_HEAD} are accepted", code="request_too_large")
        length = _header(event, b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise _HTTPError(413, f"the body has {int(length)} bytes; at most {MAX_BODY} "
                                  f"are accepted", code="request_too_large")
        if self.h11.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        return event

    async def _read_body(self, request: h11.Request) -> bytes:
        body = bytearray()
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            if isinstance(event, h11.ConnectionClosed):
                raise _Gone
            body += event.data
            if len(body) > MAX_BODY:  # a chunked body has no length to check up front
                raise _HTTPError(413, f"the body is over {MAX_BODY} bytes, the most "
                                      f"accepted", code="request_too_large")
        return bytes(body)

    async def _route(self, request: h11.Request, body: bytes) -> None:
        path = _path(request)
        if path not in _ROUTES:
            raise _HTTPError(404, f"no {path.decode(errors='replace')!r} here; the "
                                  f"endpoints are POST /v1/completions, GET /v1/models and "
                                  f"GET /health", code="not_found")
        if request.method != _ROUTES[path]:
            raise _HTTPError(405, f"{path.decode()} takes {_ROUTES[path].decode()}, not "
                                  f"{request.method.decode(errors='replace')}",
                             code="method_not_allowed")
        name = self.server.info.name
        if path == b"/health":
            up = self.server.accepting
            await self._reply({"status": "ok" if up else "draining"}, 200 if up else 503)
        elif path == b"/v1/models":
            await self._reply({"object": "list", "data": [
                {"id": name, "object": "model", "created": self.created, "owned_by": "narun",
                 "max_model_len": self.server.info.context}]}, 200)
        else:
            await self._complete(_parse_completion(body, name))

    # -- a completion ----------------------------------------------------------------------
    async def _complete(self, c: _Completion) -> None:
        if not self.server.accepting:
            raise _HTTPError(503, "the server is shutting down and takes no new requests; "
                                  "retry on another replica", code="draining")
        reply = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                 "created": int(time.time()), "model": self.server.info.name}
        out = _Output(self.server.tokenizer, c.request.stop)
        if c.stream:
            out.on_piece = lambda text, i: self._chunk(reply, out, c, text, i)
        try:
            handle = self.server.submit(c.request, out)
        except RequestError as e:
            raise _HTTPError(429 if e.code == "busy" else 400, e.message,
                             code="server_busy" if e.code == "busy" else None) from None
        if c.stream:
            self._start_stream()  # now: a client waiting for the first token sees the head
        watch = asyncio.create_task(self._watch())
        ended = asyncio.create_task(out.ended.wait())
        try:
            await asyncio.wait([watch, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            ended.cancel()
            await asyncio.gather(watch, ended, return_exceptions=True)
            if not out.server_done:  # the client left, or the text stopped before the tokens
                self.server.cancel(handle)
        if not out.ended.is_set() or self.writer.transport.is_closing():
            raise _Gone
        if self.overflowed:
            raise _Gone  # a client that stopped reading: its stream was cancelled for it
        usage = _usage(self._prompt_tokens(c.request), len(out.tokens))
        if c.stream:
            await self._end_stream(reply, out, c, usage)
        elif out.failure is not None:
            code, message = out.failure
            await self._reply(_HTTPError(500, f"the completion failed: {message}",
                                         code=code).body(), 500)
        else:
            text = "".join(out.pieces) + out.tail
            await self._reply({**reply, "choices": [_choice(text, out, c, slice(None),
                                                            out.reason)],
                               "usage": usage}, 200)

    async def _watch(self) -> None:
        """Returns when the client has gone; what it sends meanwhile (a pipelined request)
        waits in h11's buffer, up to one request's bound, past which reading stops."""
        taken = 0
        while taken <= MAX_HEAD + MAX_BODY:
            try:
                data = await self.reader.read(READ_SIZE)
            except ConnectionError:
                return
            if not data:
                return
            self.h11.receive_data(data)
            taken += len(data)
        await asyncio.Future()  # until the reply ends; the kernel's window holds the client

    def _chunk(self, reply: dict[str, Any], out: _Output, c: _Completion, text: str,
               index: int) -> bool:
        """One token's SSE event (none for a token that released no text, unless logprobs
        are asked for); False when the client cannot take it."""
        transport = self.writer.transport
        if transport.is_closing():
            return False
        self._start_stream()  # a server may call the sink from inside submit
        if text or c.logprobs:
            at = slice(index, index + 1)
            self._event({**reply, "choices": [_choice(text, out, c, at, None)]})
        self.overflowed = transport.get_write_buffer_size() > self.max_buffered
        return not self.overflowed

    def _start_stream(self) -> None:
        if self.h11.our_state is h11.SEND_RESPONSE:
            self._send(h11.Response(status_code=200, reason=b"OK", headers=[
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]))

    async def _end_stream(self, reply: dict[str, Any], out: _Output, c: _Completion,
                          usage: dict[str, int]) -> None:
        self._start_stream()
        if out.failure is not None:
            code, message = out.failure
            self._event(_HTTPError(500, f"the completion failed: {message}", code=code).body())
            self._send(h11.EndOfMessage())
            await self._drain()
            raise _Gone  # mid-stream failure: the reply ends here, and so does the connection
        self._event({**reply, "choices": [_choice(out.tail, out, c, slice(0, 0), out.reason)]})
        if c.include_usage:  # OpenAI: a last chunk with no choices and the whole usage
            self._event({**reply, "choices": [], "usage": usage})
        self._send(h11.Data(data=b"data: [DONE]\n\n"))
        self._send(h11.EndOfMessage())
        await self._drain()

    def _prompt_tokens(self, request: Request) -> int:
        if request.text is not None:
            return len(self.server.tokenizer.encode(request.text))
        return len(request.prompt)

    # -- writing ---------------------------------------------------------------------------
    def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)

    def _event(self, doc: dict[str, Any]) -> None:
        self._send(h11.Data(data=b"data: " + json.dumps(doc).encode() + b"\n\n"))

    async def _reply(self, doc: dict[str, Any], status: int, *, close: bool = False,
                     allow: bytes | None = None) -> None:
        data = json.dumps(doc).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(data)).encode())]
        if close or not self.server.accepting:  # draining: no keep-alive either
            headers.append((b"connection", b"close"))
        if allow:
            headers.append((b"allow", allow))
        self._send(h11.Response(status_code=status, headers=headers,
                                reason=_REASONS[status].encode()))
        self._send(h11.Data(data=data))
        self._send(h11.EndOfMessage())
        await self._drain()

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:
            raise _Gone from None  # not reading its reply: it must not hold the connection


def _choice(text: str, out: _Output, c: _Completion, at: slice,
            reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0,
            "logprobs": out.logprobs_object(at) if c.logprobs else None,
            "finish_reason": reason}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _path(request: h11.Request | None) -> bytes:
    return b"" if request is None else request.target.split(b"?", 1)[0]


def _header(request: h11.Request, name: bytes) -> bytes | None:
    return next((v for k, v in request.headers if k == name), None)
