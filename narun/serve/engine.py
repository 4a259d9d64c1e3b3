"""The decode core of a streaming inference server: continuous (iteration-level) batching.

The server calls `add` as requests arrive, `cancel` when a client goes away, and `step` in
a loop; each step returns the tokens it produced. A step:

1. reports the requests cancelled since the last step;
2. lets queued requests into free slots (first come, first served);
3. runs one forward over all running sequences: one new token for each decoding
   sequence, plus up to `prefill_chunk` prompt tokens of the sequences still prefilling,
   so a long prompt costs everyone else a bounded delay per step, not a stall;
4. samples the next token of every sequence whose logits were computed, each with its own
   temperature, top_k and generator, and retires those that hit max_new_tokens ("length")
   or one of their stop sequences ("stop").

A request's tokens do not depend on what else runs: its keys and values live in its own
slot, its queries see only its own positions, and its generator is seeded by the request.
Greedy tokens equal `GPT.generate(prompt, n, temperature=0)`; sampled tokens equal
`GPT.generate` with the same seed (both draw one uniform per token with `draw_tokens`).
The engine is single-threaded; the server owns queue bounds, timeouts and sockets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import narun
from narun.errors import ConfigError
from narun.models._inference import InferenceWeights
from narun.models.gpt import GPT, draw_tokens, sampling_probs
from narun.serve.kvcache import SlotKVCache, StepPlan


@dataclass(frozen=True)
class Output:
    """One event of one request. `token` is None only when it was cancelled; `index` is the
    token's place among the request's generated tokens (for a cancellation: how many were
    generated). `logprob` is the token's log-probability under the distribution it was drawn
    from (tempered, top_k-limited); for greedy requests, under the model's own softmax.
    `finished` is None while more tokens follow, else "length", "stop" or "cancelled"; a
    stop sequence's tokens are all emitted, the last one with finished="stop"."""

    request_id: Hashable
    token: int | None
    logprob: float | None
    index: int
    finished: str | None = None


@dataclass(eq=False)
class _Sequence:
    request_id: Hashable
    prompt: np.ndarray
    max_new_tokens: int
    temperature: float
    top_k: int | None
    stop: list[tuple[int, ...]]
    rng: np.random.Generator
    slot: int = -1
    fed: int = 0  # tokens whose keys and values are in the slot
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class Engine:
    """Continuous batching over one GPT: at most `max_batch` sequences run at once, each in
    its own slot of a preallocated KV cache of the model's block_size. It serves the weights
    the model holds when the engine is made (laid out once for inference); a model whose
    weights change afterwards needs a new engine.

        >>> engine = Engine(model, max_batch=8, prefill_chunk=64)
        >>> engine.add("a", tok.encode("Once"), max_new_tokens=20, temperature=0.8, seed=1)
        >>> while not engine.idle:
        ...     for out in engine.step():
        ...         print(out.request_id, out.token, out.finished)
    """

    def __init__(self, model: GPT, max_batch: int = 8, prefill_chunk: int = 64) -> None:
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Engine: {name} must be an int >= 1, got {value!r}")
        self.model = model.eval()  # serving is inference: dropout off, for good
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        cfg = model.config
        self._weights = InferenceWeights.of(model)
        self._cache = SlotKVCache(cfg.n_layer, max_batch, cfg.n_head, cfg.block_size,
                                  cfg.n_embd // cfg.n_head, model.wte.weight)
        self._queue: deque[_Sequence] = deque()
        self._slots: list[_Sequence | None] = [None] * max_batch
        self._running: list[_Sequence] = []  # in order of admission
        self._live: dict[Hashable, _Sequence] = {}
        self._cancelled: list[_Sequence] = []

    # ---- the caller's side ---------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in a slot (prefilling or decoding)."""
        return len(self._running)

    @property
    def idle(self) -> bool:
        """Nothing to run and nothing left to report: `step` would return []."""
        return not (self._queue or self._running or self._cancelled)

    def add(self, request_id: Hashable, prompt_ids: Sequence[int] | np.ndarray,
            max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
            seed: int | None = None, stop: Sequence[Sequence[int]] = ()) -> None:
        """Queue a request; it joins at a coming step. Raises ConfigError (a ValueError)
        naming the argument when the request cannot run: an empty prompt, token ids outside
        the vocabulary, prompt + max_new_tokens beyond the model's block_size, a bad
        sampling argument, or a request_id that is still queued or running."""
        cfg = self.model.config
        if request_id in self._live:
            raise ConfigError(f"add: request_id {request_id!r} is already queued or running")
        prompt = _token_ids("prompt_ids", prompt_ids, cfg.vocab_size)
        if len(prompt) == 0:
            raise ConfigError("add: prompt_ids is empty; a request needs at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ConfigError(f"add: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > cfg.block_size:
            raise ConfigError(
                f"add: prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} = "
                f"{len(prompt) + max_new_tokens} exceeds the model's block_size "
                f"{cfg.block_size}; shorten the prompt or ask for fewer tokens")
        if not (isinstance(temperature, (int, float, np.integer, np.floating))
                and not isinstance(temperature, bool)
                and temperature >= 0.0 and math.isfinite(temperature)):  # also refuses NaN
            raise ConfigError(f"add: temperature must be a finite number >= 0 (0 = greedy), "
                              f"got {temperature}")
        if top_k is not None and (isinstance(top_k, bool)
                                  or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ConfigError(f"add: top_k must be an int >= 1 (or None for no limit), "
                              f"got {top_k!r}")
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
            raise ConfigError(f"add: stop must be a list of token-id sequences, got {stop!r}")
        stops = []
        for i, s in enumerate(stop):
            ids = _token_ids(f"stop[{i}]", s, cfg.vocab_size)
            if len(ids) == 0:
                raise ConfigError(f"add: stop[{i}] is empty; a stop sequence needs a token")
            stops.append(tuple(int(t) for t in ids))
        seq = _Sequence(request_id, prompt, int(max_new_tokens), float(temperature),
                        None if top_k is None else int(top_k), stops,
                        np.random.default_rng(seed))
        self._queue.append(seq)
        self._live[request_id] = seq

    def cancel(self, request_id: Hashable) -> bool:
        """Stop a queued or running request; the next `step` reports it with
        finished="cancelled" and frees its slot at once. False when the id is unknown or
        already finished (a client may cancel after the last token was sent)."""
        seq = self._live.pop(request_id, None)
        if seq is None:
            return False
        if seq.slot < 0:
            self._queue.remove(seq)
        else:
            self._release(seq)
        self._cancelled.append(seq)
        return True

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[Output]:
        """Run one iteration; returns what it produced: the cancellations since the last
        step, then one Output per sequence that got a token (decoding ones by slot, then
        those whose prompt was completed). If the forward raises, no sequence has advanced
        and the cancellations are reported by the next step."""
        outputs = [Output(s.request_id, None, None, len(s.generated), "cancelled")
                   for s in self._cancelled]
        self._admit()
        plan, ids, sampled = self._plan()
        if sampled or plan.chunks:
            logits = self._forward(plan, ids, sampled)
            for seq, token, logprob in zip(sampled, *self._choose(sampled, logits),
                                           strict=True):
                outputs.append(self._emit(seq, token, logprob))
        self._cancelled.clear()
        return outputs

    def _admit(self) -> None:
        while self._queue and len(self._running) < self.max_batch:
            seq = self._queue.popleft()
            seq.slot = self._slots.index(None)  # the lowest free slot keeps the batch compact
            self._slots[seq.slot] = seq
            self._running.append(seq)

    def _plan(self) -> tuple[StepPlan, list[int], list[_Sequence]]:
        """The step's tokens (decode tokens by slot, then prompt chunks by admission) and the
        sequences that get a next token from it, in the order of their logits."""
        decoding = [s for s in self._slots if s is not None and s.fed >= len(s.prompt)]
        plan = StepPlan([s.slot for s in decoding], [s.fed for s in decoding])
        ids = [s.generated[-1] for s in decoding]
        sampled = list(decoding)
        budget = self.prefill_chunk if len(decoding) < len(self._running) else 0
        for seq in self._running:
            if budget == 0:
                break
            if not seq.prefilling:
                continue
            n = min(budget, len(seq.prompt) - seq.fed)
            plan.chunks.append((seq.slot, seq.fed, n))
            ids.extend(seq.prompt[seq.fed:seq.fed + n].tolist())
            budget -= n
            if seq.fed + n == len(seq.prompt):
                sampled.append(seq)
        return plan, ids, sampled

    def _forward(self, plan: StepPlan, ids: list[int], sampled: list[_Sequence]) -> np.ndarray:
        """Logits (len(sampled), vocab) in the model's dtype."""
        rows, at = list(range(len(plan.decode_slots))), len(plan.decode_slots)
        finishing = {id(s) for s in sampled}
        for slot, _, n in plan.chunks:
            at += n
            if id(self._slots[slot]) in finishing:
                rows.append(at - 1)  # the prompt's last token predicts the first new one
        model = self.model
        if model.training:  # someone switched it back; a walk over the modules, only then
            model.eval()
        with narun.no_grad():
            idx = narun.tensor(np.asarray(ids, dtype=np.int64)[None],
                               device=model.wte.weight.device)
            logits = model.forward_at(idx, plan.positions(), self._cache.layers(plan), rows,
                                     self._weights)
        for seq in sampled[:len(plan.decode_slots)]:  # the decoding ones, by slot
            seq.fed += 1
        for slot, start, n in plan.chunks:
            self._slots[slot].fed = start + n
        return logits.numpy()[0]

    @staticmethod
    def _choose(sampled: list[_Sequence], logits: np.ndarray) -> tuple[list[int], list[float]]:
        """Each sequence's next token and its logprob; greedy rows all at once, in the
        logits' dtype (float64's exp costs ~6x float32's here: 85 vs 15 us for 32 x 256);
        sampled rows in float64, as `generate` samples."""
        greedy = [i for i, s in enumerate(sampled) if s.temperature <= 0]
        if len(greedy) == len(sampled):  # all greedy: no per-sequence work
            return _greedy(logits)
        tokens, logprobs = [0] * len(sampled), [0.0] * len(sampled)
        if greedy:
            for i, token, logprob in zip(greedy, *_greedy(logits[greedy]), strict=True):
                tokens[i], logprobs[i] = token, logprob
        for i, seq in enumerate(sampled):
            if seq.temperature > 0:
                p = sampling_probs(logits[i:i + 1].astype(np.float64), seq.temperature,
                                   seq.top_k)
                tokens[i] = int(draw_tokens(p, seq.rng)[0])
                logprobs[i] = float(np.log(p[0, tokens[i]]))
        return tokens, logprobs

    def _emit(self, seq: _Sequence, token: int, logprob: float) -> Output:
        generated = seq.generated
        generated.append(token)
        finished = None
        if seq.stop and any(tuple(generated[-len(s):]) == s for s in seq.stop):
            finished = "stop"
        elif len(generated) == seq.max_new_tokens:
            finished = "length"
        if finished is not None:
            del self._live[seq.request_id]
            self._release(seq)
        return Output(seq.request_id, token, logprob, len(generated) - 1, finished)

    def _release(self, seq: _Sequence) -> None:
        self._slots[seq.slot] = None
        self._running.remove(seq)


def _greedy(logits: np.ndarray) -> tuple[list[int], list[float]]:
    """The argmax of each row (the first of ties, as `generate`'s float64 argmax: widening
    is exact) and its log-softmax, exp in the logits' dtype and the sum in float64."""
    best = logits.argmax(axis=-1)
    top = logits.max(axis=-1)  # the logit at the argmax
    lp = -np.log(np.exp(logits - top[:, None]).sum(axis=-1, dtype=np.float64))
    return best.tolist(), lp.tolist()


def _token_ids(name: str, ids: Any, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ConfigError(f"add: {name} must be a 1-D sequence of token ids, got "
                          f"{arr.dtype} array of shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
        raise ConfigError(f"add: {name} holds token id {bad}, outside the model's vocabulary "
                          f"[0, {vocab_size})")
    return arr
