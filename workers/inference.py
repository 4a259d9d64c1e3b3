"""`python -m workers inference`: one inference worker of `narun serve`.

It loads the model once, connects a DEALER to the front's internal socket, says `hello`,
and then runs the decode loop of a continuous-batching Engine: requests (`generate`, with
the prompt as ids) join at the next step, `abort` drops one, and every step that produced
anything is reported as one `tokens` message. The loop blocks in the socket only when the
engine has nothing to run: a step is compute, and between steps the socket is polled
without waiting, so a new request waits at most one step to join.

Synchronous on purpose: one thread alternates between the socket and the model, and
asyncio would add a scheduler between them with nothing else to schedule.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import structlog
import zmq

import narun
from narun.errors import ConfigError, ProtocolError
from narun.serve.engine import Engine, Output
from narun.serve.streams import Tokenizer
from protocol import DEFAULT_LIMITS, Message, decode, encode, error_message, message

log = structlog.get_logger("narun.serve")

SEED_SPACE = 1 << 64  # a wire seed is any int64; NumPy's generators take it modulo 2**64


@dataclass(frozen=True)
class InferenceSpec:
    """What the front tells each worker (as JSON on its command line)."""

    checkpoint: str
    front: str  # the front's internal endpoint
    max_batch: int
    prefill_chunk: int
    device: str = "cpu"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> InferenceSpec:
        return cls(**json.loads(text))


class InferenceWorker:
    def __init__(self, rank: int, spec: InferenceSpec) -> None:
        from narun.models import load_trained

        self.rank = rank
        model = load_trained(spec.checkpoint).model
        if spec.device != "cpu":
            model.to(device=spec.device)
        self.engine = Engine(model, max_batch=spec.max_batch, prefill_chunk=spec.prefill_chunk)
        self.tokenizer = Tokenizer()
        self.spec = spec
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.linger = 0
        # the route the front knows this rank by; a restarted worker takes it over
        self.socket.identity = f"inference-{rank}".encode()
        self.socket.connect(spec.front)

    def run(self) -> int:
        self._send(message("hello", 1, role="inference", rank=self.rank,
                           software=narun.__version__))
        try:
            while True:
                wait = -1 if self.engine.idle else 0  # ms: block only with nothing to run
                while self.socket.poll(wait, zmq.POLLIN):
                    if not self._handle(self._recv()):
                        return 0
                    wait = 0
                outputs = self.engine.step()
                if outputs:
                    self._send(_tokens_message(outputs))
        finally:
            self.socket.close(linger=0)
            self._context.term()

    def _recv(self) -> Message | None:
        frames = self.socket.recv_multipart(copy=False)
        try:
            return decode(frames, DEFAULT_LIMITS)
        except ProtocolError as exc:  # the front speaks our protocol: this is a bug there
            log.error("inference.refused", rank=self.rank, error=str(exc))
            return None

    def _handle(self, msg: Message | None) -> bool:
        """False when the worker should exit."""
        if msg is None or msg.type == "welcome":
            return True
        if msg.type == "generate":
            try:
                self.engine.add(
                    msg.id, msg["prompt"], msg["max_tokens"], temperature=msg["temperature"],
                    top_k=msg["top_k"] or None, seed=msg["seed"] % SEED_SPACE,
                    stop=[self.tokenizer.encode(s) for s in msg.get("stop") or ()])
            except ConfigError as exc:  # the front checks first; a disagreement is named
                self._send(error_message(msg.id, "invalid", str(exc)))
        elif msg.type == "abort":
            self.engine.cancel(msg.id)
        elif msg.type == "shutdown":
            return False
        else:
            self._send(error_message(msg.id, "unsupported",
                                     f"an inference worker does not handle {msg.type}"))
        return True

    def _send(self, msg: Message) -> None:
        self.socket.send_multipart(encode(msg, DEFAULT_LIMITS), copy=False)


def _tokens_message(outputs: list[Output]) -> Message:
    return message(
        "tokens", 0, ids=[o.request_id for o in outputs],
        tokens=[-1 if o.token is None else o.token for o in outputs],
        logprobs=np.array([0.0 if o.logprob is None else o.logprob for o in outputs]),
        finished=[o.finished or "" for o in outputs])


def main(rank: int, spec_json: str) -> int:
    spec = InferenceSpec.from_json(spec_json)
    try:
        worker = InferenceWorker(rank, spec)
    except Exception as exc:  # the front reads the reason from our stderr
        log.error("inference.start_failed", rank=rank, error=str(exc))
        raise
    log.info("inference.ready", rank=rank, pid=os.getpid())
    return worker.run()
