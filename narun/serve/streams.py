"""What a front end (the ZeroMQ socket, the HTTP endpoint) hands the inference server, and
what it gets back: a checked `Request`, and a `Sink` the server feeds one stream's events.

    >>> handle = server.submit(Request(prompt=ids, max_tokens=64), sink)   # RequestError?
    >>> server.cancel(handle)     # the sink then gets done("cancelled", ...)

Each stream ends with exactly one `done` or one `error` call; `token` calls come before it,
in index order. A sink is called on the event loop and must not block: a receiver that
cannot take an event now returns False from `token`, and the server cancels its stream
(a client that stopped reading must not hold a slot, nor make the server buffer for it).
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from narun.data import ByteTokenizer
from narun.errors import NarunError

_WIRE_INT_MAX = (1 << 64) - 1  # the largest int the protocol carries (msgpack's uint64)
_FLOAT_MAX = float.fromhex("0x1.fffffffffffffp+1023")  # the largest finite float
# Stop strings a request may give (OpenAI's bound): the worker compares each one with the
# stream's last tokens at every step, so a generate with the 65 536 the wire allows slowed
# the step of every stream on its worker ~10 ms per token.
MAX_STOPS = 4


class RequestError(NarunError):
    """A request refused before it ran: `code` is the protocol error code (`invalid`: the
    request asks what this server cannot do, the message names the field; `busy`: the
    queue is full, retry later), `message` says what was wrong and how to fix it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    """One generation. `prompt`: token ids (1-D int64), or None when `text` is given;
    `temperature` 0 is greedy; `top_k` 0 means no limit; `seed` drives sampling, so the same
    seed gives the same tokens whatever else runs; `stop`: strings that end the stream
    (their tokens are the last ones sent, done reason `stop`)."""

    prompt: np.ndarray | None = None
    text: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """What clients may ask of the served model."""

    name: str          # the served run or checkpoint's name (OpenAI's `model`)
    vocab_size: int
    context: int       # block_size: prompt + max_tokens must fit
    max_tokens: int    # the server's cap on one request's max_tokens


class Sink(Protocol):
    def token(self, index: int, token: int, logprob: float, text: str) -> bool:
        """One generated token; `text` is what it completed (may be "" mid-character).
        Return False when the receiver cannot take it: the stream is then cancelled."""

    def done(self, reason: str, tokens: int, seconds: float) -> None:
        """The stream ended: reason `length`, `stop` or `cancelled`."""

    def error(self, code: str, message: str) -> None:
        """The stream failed (its worker died, the server stopped): nothing more comes."""


@dataclass(eq=False)
class Tokenizer:
    """The served model's tokenizer (narun's language models are byte level), and the
    incremental decoding of one stream: a character may span several tokens."""

    inner: ByteTokenizer = field(default_factory=ByteTokenizer)

    def encode(self, text: str) -> np.ndarray:
        return self.inner.encode(text)

    def decoder(self) -> codecs.IncrementalDecoder:
        """text = decoder.decode(token_bytes(t)) for each token t, in order."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __post_init__(self) -> None:
        # one bytes object per token id, made once: decoding one token through the
        # tokenizer's array path cost ~40 us, and a server decodes every token it streams
        self._bytes = tuple(self.inner.decode_bytes(np.arange(self.inner.vocab_size)[i:i + 1])
                            for i in range(self.inner.vocab_size))

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]


def check_request(req: Request, info: ModelInfo, tok: Tokenizer) -> np.ndarray:
    """The prompt's ids of a request this model can run, or RequestError(`invalid`) naming
    the field that is wrong and what would be right. Stop strings are only checked: the
    worker that runs the request encodes them."""
    if (req.prompt is None) == (req.text is None):
        raise RequestError("invalid", "give the prompt as token ids or as text, not both "
                                      "and not neither")
    if req.text is not None:
        if not isinstance(req.text, str):
            raise RequestError("invalid", f"prompt text must be a string, got "
                                          f"{type(req.text).__name__}")
        ids = tok.encode(req.text)
    else:
        ids = np.asarray(req.prompt)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise RequestError("invalid", f"prompt must be a 1-D array of integer token ids, "
                                          f"got {ids.dtype} of shape {list(ids.shape)}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= info.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= info.vocab_size)][0])
            raise RequestError("invalid", f"prompt holds token id {bad}, outside the model's "
                                          f"vocabulary [0, {info.vocab_size})")
    if ids.size == 0:
        raise RequestError("invalid", "the prompt is empty; send at least one token")
    mt = req.max_tokens
    if isinstance(mt, bool) or not isinstance(mt, (int, np.integer)) or mt < 1:
        raise RequestError("invalid", f"max_tokens must be an int >= 1, got {mt!r}")
    if mt > info.max_tokens:
        raise RequestError("invalid", f"max_tokens {mt} is above this server's cap of "
                                      f"{info.max_tokens}; ask for at most {info.max_tokens}")
    if len(ids) >= info.context:
        raise RequestError("invalid", f"the prompt has {len(ids)} tokens; the model's "
                                      f"context is {info.context}, so a prompt may have at "
                                      f"most {info.context - 1}")
    if len(ids) + mt > info.context:
        raise RequestError("invalid", f"prompt ({len(ids)} tokens) + max_tokens ({mt}) is "
                                      f"{len(ids) + mt}, beyond the model's context of "
                                      f"{info.context}; ask for at most "
                                      f"{info.context - len(ids)} tokens")
    t = req.temperature
    # an int beyond float's range (JSON's 1e400 written out in digits) is refused before
    # math.isfinite, which raises OverflowError on it: a 500 instead of this message
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 or t > _FLOAT_MAX \
            or not math.isfinite(t):
        raise RequestError("invalid", f"temperature must be a finite number >= 0 (0 is "
                                      f"greedy), got {t!r}")
    # top_k and seed travel to the worker as msgpack ints: one beyond 2**64 - 1 cannot be
    # sent, and would fail in dispatch after the stream was queued (leaking it)
    k = req.top_k
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= _WIRE_INT_MAX:
        raise RequestError("invalid", f"top_k must be an int >= 0 (0: no limit) and at "
                                      f"most {_WIRE_INT_MAX}, got {k!r}")
    seed = req.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _WIRE_INT_MAX:
        raise RequestError("invalid", f"seed must be an int >= 0 and at most "
                                      f"{_WIRE_INT_MAX}, got {seed!r}")
    if len(req.stop) > MAX_STOPS:
        raise RequestError("invalid", f"stop holds {len(req.stop)} strings; at most "
                                      f"{MAX_STOPS} are accepted")
    for i, s in enumerate(req.stop):
        if not isinstance(s, str) or not s:
            raise RequestError("invalid", f"stop[{i}] must be a non-empty string, got {s!r}")
        try:  # JSON's "\ud800" is a str no UTF-8 encoder takes: the worker's message neither
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("invalid", f"stop[{i}] is not valid Unicode text (it holds a "
                                          f"lone surrogate), got {s!r}") from None
    return ids
