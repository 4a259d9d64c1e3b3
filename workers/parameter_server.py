"""A parameter-server shard: its buckets of the flat parameters, their optimizer state, and
the optimizer itself.

The shard never builds the model or the dataset: it holds only the buckets the plan assigns
to it (narun.runtime.buckets), reads their starting values (and, resuming, their optimizer
state) as byte ranges of the coordinator's initial-state file or of the checkpoint, and
takes the optimizer's groups and the LR schedule from an outline of the job over the
parameters' shapes (narun.runtime.shard_start), so its memory follows its slice. Each
bucket has an optimizer of the job's class over "pieces": flat views of the bucket, one per
parameter part, grouped like the job's optimizer (weight decay on matrices only).
Element-wise optimizers act per element, so updating pieces is exactly updating the whole
parameters.

- ps-sync: the pushes of step t for a bucket are held until every member trainer has
  pushed it; then the mean of the pushes is applied once and every pusher gets the new
  values. Members are every trainer, less those the coordinator dropped (dead, and not back
  within runtime.rejoin_timeout): the mean over fewer pushes keeps the gradient's scale. A
  push for a step the bucket already completed (a restarted trainer catching up) gets the
  current values back, unapplied. The values after an eval or checkpoint step are kept (a
  snapshot) until the coordinator has taken them; at most MAX_SNAPSHOTS per bucket, so
  trainers that run ahead of a slow coordinator wait instead of piling up copies.
- ps-async: each push is applied at once; a push computed on a version more than
  `max_staleness` behind the bucket's is refused with `error` code `stale`. A trainer may
  also run at most `max_staleness` steps ahead of the slowest member (SSP's clock bound):
  its push waits until the others catch up, so a trainer that is away (restarting) or slow
  does not leave the rest training alone.

Clipping by the global gradient norm (training.grad_clip) needs the norm of the whole mean
gradient, and a shard holds only its slice. In ps-sync a completed step is therefore held,
not applied: each pusher gets the sum of squares of the bucket's mean gradient
(`grad_norm`), sums them over all buckets, and sends every shard the total (`apply_step`).
The first `apply_step` of a step applies the shard's buckets, scaled as clip_grad_norm_
would scale them. In ps-async each push is one trainer's step, which the trainer clips.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from narun import checkpoint as ckpt
from narun.errors import ConfigError
from narun.nn.utils import clip_coefficient
from narun.runtime.buckets import Bucket
from narun.runtime.hosts import is_loopback, local_endpoint, remove_local_endpoint
from narun.runtime.mailbox import Mailbox, ReplyError, new_id
from narun.runtime.shard_start import job_outline
from narun.runtime.spec import WorkerSpec
from narun.runtime.waiting import Broadcast
from narun.tensor._tensor import Tensor
from protocol import Message, message, open_channel, reply
from workers._job import JobActor

log = structlog.get_logger("workers.ps")

#: Snapshots (a bucket's values after an eval or checkpoint step) a bucket keeps for the
#: coordinator at most; a push that would make one more waits until it takes the oldest.
MAX_SNAPSHOTS = 2


@dataclass
class ShardBucket:
    """One bucket's values, optimizer and the pushes of the step being assembled."""

    bucket: Bucket
    w: np.ndarray
    pieces: list[Tensor]
    optimizer: Any
    group_of: list[int]  # optimizer group index -> the job optimizer's group index
    version: int = 0
    pushes: dict[int, np.ndarray] = field(default_factory=dict)
    first_push: float = 0.0  # when the step being assembled got its first push
    grad: np.ndarray | None = None
    # ps-sync with clipping: the assembled mean gradient of step `version`, waiting for the
    # global norm, and its sum of squares; last_sq is that of the step applied last.
    held: np.ndarray | None = None
    sq: float = 0.0
    last_sq: float | None = None
    moved: Broadcast = field(default_factory=Broadcast)  # on assembly, apply, snapshot taken
    snapshots: dict[int, tuple[np.ndarray, list[dict[str, Any]]]] = field(default_factory=dict)

    def piece_states(self) -> list[dict[str, Any]]:
        return [_copy_state(self.optimizer.state.get(p, {})) for p in self.pieces]

    def apply(self, grad: np.ndarray, lrs: list[float]) -> None:
        for piece, t in zip(self.bucket.pieces, self.pieces):
            t.grad = Tensor._wrap(grad[piece.offset:piece.offset + piece.size])
        for group, gi in zip(self.optimizer.param_groups, self.group_of):
            group["lr"] = lrs[gi]
        self.optimizer.step()
        for t in self.pieces:
            t.grad = None
        self.version += 1
        self.moved.notify()


class ParameterServer(JobActor):
    role = "ps"

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        super().__init__(rank, spec)
        cfg = self.cfg
        if spec.init_state is None:
            raise ConfigError(f"worker spec of ps {rank}: init_state is missing; a shard "
                              f"starts from the coordinator's initial-state file "
                              f"(narun.runtime.shard_start.write_init_state)")
        self.outline = job_outline(cfg, spec.init_state, spec.resume)
        self.start = self.outline.start
        self.plan = self.outline.plan(cfg.runtime.ps_shards, spec.bucket_bytes,
                                      spec.stage_names)
        self.mode = cfg.runtime.mode
        # a data-parallel pipeline's shard serves its stage's replicas as ps-sync serves
        # trainers: they are its "trainers" 0 .. runtime.workers - 1
        self.sync = self.mode in ("ps-sync", "pipeline")
        self.workers = cfg.runtime.workers
        self.members = set(range(self.workers))  # whose pushes complete a ps-sync step
        # ps-sync clips here, from the global norm the trainers send; ps-async trainers clip
        self.clip = (cfg.training.grad_clip or None) if self.sync else None
        self._clock: dict[int, int] = {}  # ps-async: trainer rank -> the step it pushes
        self._paced = Broadcast()  # when a trainer's clock or the members move
        self.max_staleness = cfg.runtime.max_staleness
        self.stopped = asyncio.Event()
        self.buckets = {b.key: self._make_bucket(b) for b in self.plan.shard_buckets(rank)}
        self._lrs: dict[int, list[float]] = {}
        self._timings: dict[int, dict[str, float]] = {}  # ps-sync steps being applied
        t = cfg.training
        self._snapshot_steps = {t.steps, spec.stop_at or t.steps}
        for every in (t.checkpoint_every, t.eval_every):
            if every:
                self._snapshot_steps.update(range(every, t.steps, every))
        self.server: Mailbox | None = None
        self._ipc: str | None = None  # the Unix socket endpoint it serves on, on one host

    def _make_bucket(self, bucket: Bucket) -> ShardBucket:
        job = self.outline
        full = job.optimizer
        group_index = {id(p): gi for gi, g in enumerate(full.param_groups) for p in g["params"]}
        w = np.empty(bucket.size, np.float32)
        groups: dict[int, list[Tensor]] = {}
        pieces, states = [], []
        for piece in bucket.pieces:
            t = Tensor._wrap(job.read_values(piece, w[piece.offset:piece.offset + piece.size]))
            t.requires_grad = True
            groups.setdefault(group_index[id(job.params[piece.index])], []).append(t)
            pieces.append(t)
            states.append(job.read_state(piece))
        order = sorted(groups)
        opt = type(full)([{**{k: v for k, v in full.param_groups[gi].items() if k != "params"},
                           "params": groups[gi]} for gi in order])
        for t, state in zip(pieces, states):
            if state:
                opt.state[t] = state
        return ShardBucket(bucket, w, pieces, opt, order, version=self.start)

    # -- lifecycle ---------------------------------------------------------------------
    async def setup(self) -> None:
        assert self.context is not None
        # Across hosts: bound on every interface, reached at the host's own address. On
        # one host: a Unix socket, which moves the buckets faster than loopback TCP.
        host = self.spec.host
        if is_loopback(host):
            self._ipc = local_endpoint(f"ps-{self.rank}")
            bind = self._ipc or "tcp://127.0.0.1:0"
        else:
            bind = "tcp://*:0"
        channel = open_channel(self.context, "router", bind=bind, curve=self.curve_server())
        endpoint = channel.endpoint.replace("0.0.0.0", host, 1)
        # In flight at once: a held push per trainer and bucket, a pull each, and twice
        # that while a replaced trainer's pushes are still held beside its successor's.
        bound = 2 * self.workers * (len(self.buckets) + 2) + 16
        self.server = Mailbox(channel, f"ps {self.rank}", self._dispatch, on_error=self.fail,
                              max_requests=max(bound, 1024)).start()
        # The coordinator reads this one line to learn where trainers connect.
        sys.stdout.write(json.dumps({"endpoint": endpoint}) + "\n")
        sys.stdout.flush()

    async def teardown(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._ipc is not None:
            remove_local_endpoint(self._ipc)

    async def main(self) -> None:
        await self.stopped.wait()

    async def on_shutdown(self, msg: Message, route: bytes | None) -> None:
        self.stopped.set()
        await super().on_shutdown(msg, route)

    def on_leave(self) -> None:
        # This shard's state exists nowhere else: keep serving, and ask the coordinator to
        # checkpoint the job and restart it without us (it stops us when done).
        assert self.control is not None
        self.tasks.spawn(self.control.send(message(
            "shutdown", new_id(), reason=f"{self.name} got SIGTERM", drain=True)),
            "ask to leave")

    # -- the schedule ------------------------------------------------------------------
    def lrs_at(self, step: int) -> list[float]:
        """The lr of each job optimizer group at `step`, from the job's own scheduler."""
        if step not in self._lrs:
            sched, groups = self.outline.scheduler, self.outline.optimizer.param_groups
            while sched.last_epoch < step:
                sched.step()
                self._lrs[sched.last_epoch] = [g["lr"] for g in groups]
            if step not in self._lrs:  # before the schedule's position: not reachable
                self._lrs[step] = [g["lr"] for g in groups]
        return self._lrs[step]

    # -- trainers' requests ------------------------------------------------------------
    async def on_push_grads(self, msg: Message, route: bytes | None) -> Message:
        grads: dict[str, np.ndarray] = msg["grads"]
        out: dict[str, np.ndarray] = {}
        version, sq = 0, 0.0
        for key, grad in grads.items():
            b = self._bucket(key)
            grad = np.asarray(grad)
            if grad.dtype != np.float32 or grad.shape != (b.bucket.size,):
                raise ReplyError("protocol", f"ps {self.rank}: bucket {key} takes float32 "
                                             f"({b.bucket.size},), got {grad.dtype} {grad.shape}")
            if self.sync:
                await self._room_for_snapshot(b, msg["step"])
                on_time = await self._push_sync(b, msg["step"], msg["rank"], grad)
                if self.clip:
                    sq += self._sq_of(b, msg["step"])
                elif on_time:
                    out[key] = b.w  # zero-copy: nobody writes it before every member has it
                else:
                    out[key] = b.w.copy()  # late: the members may update it meanwhile
            else:
                await self._keep_pace(msg["rank"], msg["step"])
                self._push_async(b, msg["version"], grad)
                out[key] = b.w.copy()  # the next push may update it while this one is sent
            version = b.version
        self.step = max(self.step, version)
        if self.clip:
            return reply(msg, "grad_norm", step=msg["step"], sq=sq)
        return reply(msg, "params", version=version, params=out)

    async def _push_sync(self, b: ShardBucket, step: int, rank: int, grad: np.ndarray) -> bool:
        """Hold the push until the step completes; False when it came too late to count."""
        if step < b.version:
            return False
        if step > b.version:
            raise ReplyError("busy", f"ps {self.rank}: bucket {b.bucket.key} is assembling step "
                                     f"{b.version}, trainer {rank} pushed step {step}")
        if b.held is not None:  # assembled: a restarted trainer's recomputed push adds nothing
            return True
        if not b.pushes:
            b.first_push = time.perf_counter()
        if rank in b.pushes:
            log.info("ps.push_replaced", shard=self.rank, bucket=b.bucket.key, step=step,
                     trainer=rank)
        b.pushes[rank] = grad
        if self._complete(b):
            return True
        await self._wait_bucket(b, lambda: b.version > step or b.held is not None,
                                lambda: f"the pushes of step {step} from trainer(s) "
                                        f"{sorted(self.members - set(b.pushes))}")
        return True

    async def _room_for_snapshot(self, b: ShardBucket, step: int) -> None:
        """Hold a push of a step that ends in a snapshot while MAX_SNAPSHOTS wait for the
        coordinator (it takes them as it evaluates and checkpoints)."""
        if step + 1 not in self._snapshot_steps or step < b.version:
            return
        await self._wait_bucket(b, lambda: len(b.snapshots) < MAX_SNAPSHOTS,
                                lambda: f"the coordinator to take the snapshots of steps "
                                        f"{sorted(b.snapshots)} before step {step + 1}")

    def _complete(self, b: ShardBucket) -> bool:
        """Apply the mean of the held pushes once every member has pushed."""
        if not b.pushes or not self.members <= b.pushes.keys():
            return False
        step = b.version
        t0 = time.perf_counter()
        grads = [b.pushes[r] for r in sorted(b.pushes)]  # rank order: deterministic sums
        b.pushes = {}
        if len(grads) == 1:
            mean = grads[0]
        else:
            if b.grad is None:
                b.grad = np.empty(b.bucket.size, np.float32)
            mean = np.add(grads[0], grads[1], out=b.grad)
            for g in grads[2:]:
                mean += g
            mean *= 1.0 / len(grads)
        self._time(step, skew=t0 - b.first_push, mean=time.perf_counter() - t0)
        if self.clip:
            b.held, b.sq = mean, float(np.dot(mean, mean))  # as clip_grad_norm_ sums
            b.moved.notify()
        else:
            self._apply(b, mean, step)
        return True

    def _apply(self, b: ShardBucket, grad: np.ndarray, step: int) -> None:
        t0 = time.perf_counter()
        b.apply(grad, self.lrs_at(step))
        if b.version in self._snapshot_steps:
            b.snapshots[b.version] = (b.w.copy(), b.piece_states())
        self._time(step, optimizer=time.perf_counter() - t0, applied=1)

    def _time(self, step: int, **seconds: float) -> None:
        """Add to step `step`'s timings; once every bucket here applied it, log them
        (`ps.step` at info: scripts/bench_dp.py reads it): skew (the longest a bucket
        waited from its first push to its last), mean (averaging the pushes) and optimizer
        seconds, summed over the buckets."""
        t = self._timings.setdefault(step, {"skew": 0.0, "mean": 0.0, "optimizer": 0.0,
                                            "applied": 0})
        t["skew"] = max(t["skew"], seconds.pop("skew", 0.0))
        for k, v in seconds.items():
            t[k] += v
        if t["applied"] == len(self.buckets):
            del self._timings[step]
            log.info("ps.step", shard=self.rank, step=step, skew=t["skew"], mean=t["mean"],
                     optimizer=t["optimizer"])

    def _sq_of(self, b: ShardBucket, step: int) -> float:
        if b.version == step and b.held is not None:
            return b.sq
        if b.version == step + 1 and b.last_sq is not None:
            return b.last_sq
        raise ReplyError("not_found", f"ps {self.rank}: bucket {b.bucket.key} is at version "
                                      f"{b.version} and keeps no gradient norm of step {step}")

    async def on_apply_step(self, msg: Message, route: bytes | None) -> Message:
        """Apply the held step `step` scaled by the global norm's clip factor (once: later
        requests of the step find it applied); answer all buckets at version step + 1."""
        if not self.clip:
            raise ReplyError("unsupported", f"ps {self.rank}: apply_step is for ps-sync with "
                                            f"training.grad_clip set")
        step, rank = msg["step"], msg["rank"]
        for key, b in self.buckets.items():  # all or nothing: check every bucket first
            if b.version == step and b.held is None:
                raise ReplyError("busy", f"ps {self.rank}: bucket {key} has not assembled step "
                                         f"{step}; trainer(s) "
                                         f"{sorted(self.members - set(b.pushes))} did not push it")
            if b.version not in (step, step + 1):
                raise ReplyError("not_found", f"ps {self.rank}: bucket {key} is at version "
                                              f"{b.version}, trainer {rank} applies step {step}")
        coef = clip_coefficient(msg["norm"], self.clip)
        out: dict[str, np.ndarray] = {}
        for key, b in self.buckets.items():
            if b.version == step:
                assert b.held is not None
                grad, b.held, b.last_sq = b.held, None, b.sq
                if coef != 1.0:
                    grad = np.multiply(grad, np.float32(coef),
                                       out=grad if grad.flags.writeable else None)
                self._apply(b, grad, step)
            # zero-copy to members: nobody writes it before every member has it
            out[key] = b.w if rank in self.members else b.w.copy()
        self.step = max(self.step, step + 1)
        return reply(msg, "params", version=step + 1, params=out)

    async def _keep_pace(self, rank: int, step: int) -> None:
        """Hold a ps-async push of `step` while it is more than max_staleness steps ahead
        of the slowest other member (one that has not pushed yet counts as at the start)."""
        if step > self._clock.get(rank, self.start):
            self._clock[rank] = step
            self._wake_pacers()

        def too_far_behind() -> list[int]:
            return sorted(r for r in self.members if r != rank
                          and step - self._clock.get(r, self.start) > self.max_staleness)

        await self._paced.wait_until(
            lambda: not too_far_behind(), timeout=self.spec.wait_timeout,
            who=f"ps {self.rank}: trainer {rank} at step {step}",
            what=lambda: f"trainer(s) {too_far_behind()} to come within "
                         f"runtime.max_staleness {self.max_staleness}")

    def _wake_pacers(self) -> None:
        self._paced.notify()

    def _push_async(self, b: ShardBucket, version: int, grad: np.ndarray) -> None:
        lag = b.version - version
        if lag > self.max_staleness:
            raise ReplyError("stale", f"ps {self.rank}: bucket {b.bucket.key} is at version "
                                      f"{b.version}, the push was computed on version {version} "
                                      f"({lag} behind, runtime.max_staleness is "
                                      f"{self.max_staleness})")
        b.apply(grad, self.lrs_at(b.version // max(self.workers, 1)))

    async def on_pull_params(self, msg: Message, route: bytes | None) -> Message:
        keys = msg["keys"] or list(self.buckets)
        want = msg["min_version"]
        out, versions = {}, []
        for key in keys:
            b = self._bucket(key)
            await self._wait_bucket(b, lambda b=b: b.version >= want, f"version {want}")
            snap = b.snapshots.get(want) if self.sync else None
            if snap is not None:
                out[key], version = snap[0], want
                # a checkpoint step's snapshot waits for its checkpoint request
                _drop_snapshots(b, want if self._is_checkpoint_step(want) else want + 1)
            else:
                # a copy: pushes of others may update the bucket while this reply is sent
                out[key], version = b.w.copy(), b.version
            versions.append(version)
        return reply(msg, "params", version=min(versions), params=out)

    async def _wait_bucket(self, b: ShardBucket, ready: Callable[[], bool],
                        what: Callable[[], str] | str) -> None:
        def described() -> str:
            return f"{what() if callable(what) else what}; it is at version {b.version}"

        await b.moved.wait_until(ready, timeout=self.spec.wait_timeout,
                                 who=f"ps {self.rank}: bucket {b.bucket.key}", what=described)

    def _is_checkpoint_step(self, step: int) -> bool:
        t = self.cfg.training
        return step in (t.steps, self.spec.stop_at) or bool(
            t.checkpoint_every and step % t.checkpoint_every == 0)

    def _bucket(self, key: str) -> ShardBucket:
        b = self.buckets.get(key)
        if b is None:
            raise ReplyError("not_found", f"ps {self.rank} holds buckets {sorted(self.buckets)}, "
                                          f"not {key!r}")
        return b

    # -- the coordinator's requests ----------------------------------------------------
    async def on_members(self, msg: Message, route: bytes | None) -> Message:
        ranks = set(msg["ranks"])
        if not ranks <= set(range(self.workers)):
            raise ReplyError("protocol", f"ps {self.rank}: members {sorted(ranks)} are not all "
                                         f"trainer ranks of 0..{self.workers - 1}")
        if ranks != self.members:
            log.warning("ps.members", shard=self.rank, members=sorted(ranks),
                        of=self.workers)
        self.members = ranks
        for b in self.buckets.values():
            self._complete(b)  # a step that waited only for a dropped trainer goes on
        self._wake_pacers()
        return reply(msg, "members", ranks=sorted(ranks))

    async def on_checkpoint(self, msg: Message, route: bytes | None) -> Message:
        """Write this shard's buckets and optimizer state at `step` to `path`/ps-RANK."""
        step = msg["step"]
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, list[dict[str, Any]]] = {}
        for key, b in self.buckets.items():
            snap = b.snapshots.get(step) if self.sync else None
            if snap is None:
                if self.sync and b.version != step:
                    raise ReplyError("not_found", f"ps {self.rank}: bucket {key} is at "
                                                  f"version {b.version} and kept no snapshot of "
                                                  f"step {step}")
                snap = (b.w.copy(), b.piece_states())
            _drop_snapshots(b, step + 1)
            values, states = snap
            arrays[key] = values
            scalars[key] = []
            for i, state in enumerate(states):
                scalars[key].append({k: v for k, v in state.items() if not _is_array(v)})
                for name, v in state.items():
                    if _is_array(v):
                        arrays[f"{key}/{i}/{name}"] = v
        path = Path(msg["path"]) / f"ps-{self.rank}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: ckpt.save(arrays, path, {"step": step, "scalars": scalars}))
        return reply(msg, "checkpoint", step=step, path=str(path))


def _drop_snapshots(b: ShardBucket, upto: int) -> None:
    """Forget the snapshots of versions before `upto` (the coordinator has used them)."""
    for v in [v for v in b.snapshots if v < upto]:
        del b.snapshots[v]
    b.moved.notify()  # a push held for room may go on


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.ndim > 0


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.copy() if _is_array(v) else v) for k, v in state.items()}
