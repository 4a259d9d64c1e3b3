"""Pipeline-parallel schedules as data: what each stage does, in order, checked before it runs.

A schedule for p stages and m micro-batches is `list[list[Action]]`, one ordered list per
stage. Stage s forwards micro-batch i after receiving its input from stage s - 1 and sends
the output on to stage s + 1; backward runs the other way. The conventions every schedule
keeps, and `validate` enforces:
- stage s > 0 does `recv_act i` right before `forward i`; stage s < p-1 `send_act i` right
  after it;
- stage s < p-1 does `recv_grad i` right before `backward i`; stage s > 0 `send_grad i`
  right after it;
- every stage runs forward and backward of each micro-batch once, forward first, and ends
  with one `step`.

The transport this models: one FIFO channel per direction between neighbouring stages,
sends never block (messages queue), receives block until their message is there. Under it a
schedule can still be wrong in ways no single stage shows: two stages each waiting for the
other (deadlock), or receives that expect another order than the sends give (FIFO).
`validate` finds both by running the schedule without compute; `simulate` runs it with
costs and reports makespan, idle share (bubble) and peak activations held per stage.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from narun.errors import ConfigError

KINDS = ("forward", "backward", "send_act", "recv_act", "send_grad", "recv_grad", "step")
SCHEDULES = ("gpipe", "1f1b")


class ScheduleError(ConfigError):
    """A pipeline schedule breaks a convention, mismatches its neighbours or deadlocks (the
    message names the stage and the action)."""


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one stage: `Action("forward", 3)` reads "forward 3"; `step` has no
    micro-batch (-1) and reads "step"."""

    kind: str
    micro_batch: int = -1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"action kind: must be one of {', '.join(KINDS)}, "
                                f"got {self.kind!r}")
        if self.kind == "step" and self.micro_batch != -1:
            raise ScheduleError(f"step: takes no micro-batch (-1), got {self.micro_batch}")
        if self.kind != "step" and self.micro_batch < 0:
            raise ScheduleError(f"{self.kind}: micro-batch must be >= 0, got {self.micro_batch}")

    def __str__(self) -> str:
        return "step" if self.kind == "step" else f"{self.kind} {self.micro_batch}"


Schedule = list[list[Action]]


def _forward(s: int, p: int, i: int) -> list[Action]:
    head = [Action("recv_act", i)] if s > 0 else []
    tail = [Action("send_act", i)] if s < p - 1 else []
    return [*head, Action("forward", i), *tail]


def _backward(s: int, p: int, i: int) -> list[Action]:
    head = [Action("recv_grad", i)] if s < p - 1 else []
    tail = [Action("send_grad", i)] if s > 0 else []
    return [*head, Action("backward", i), *tail]


def _check_sizes(p: int, m: int) -> None:
    if p < 1:
        raise ScheduleError(f"stages: must be >= 1, got {p}")
    if m < 1:
        raise ScheduleError(f"micro-batches: must be >= 1, got {m}")


def gpipe(p: int, m: int) -> Schedule:
    """GPipe: every stage forwards all m micro-batches, then runs all m backwards, then steps.

    Holds m micro-batches of activations on every stage. `gpipe(2, 2)[1]` reads
    recv_act 0, forward 0, recv_act 1, forward 1, backward 0, send_grad 0, backward 1,
    send_grad 1, step.
    """
    _check_sizes(p, m)
    schedules: Schedule = []
    for s in range(p):
        actions = [a for i in range(m) for a in _forward(s, p, i)]
        # Backwards run 0..m-1 on every stage (as torch's GPipe does). What matters is that
        # all stages use the same order: the gradient channel is FIFO, so stage s must
        # receive gradients in the order stage s+1 sends them, and with one order everywhere
        # the last stage (which needs no receive) always unblocks the next one down.
        actions += [a for i in range(m) for a in _backward(s, p, i)]
        schedules.append([*actions, Action("step")])
    return schedules


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-flush): warm-up forwards, then one forward / one backward alternating,
    then the remaining backwards. Same makespan as GPipe, but stage s holds at most p - s
    micro-batches of activations instead of m. Needs m >= p.
    """
    _check_sizes(p, m)
    if m < p:
        raise ScheduleError(
            f"1f1b: needs at least as many micro-batches as stages, got {m} micro-batches for "
            f"{p} stages; raise micro-batches to at least {p} or use gpipe"
        )
    schedules: Schedule = []
    for s in range(p):
        # Stage s's first gradient arrives only after micro-batch 0 has gone through the
        # p - s - 1 stages after it and come back; it fills that wait with p - s - 1 forwards.
        # More would only hold more activations (the last stage has no wait and alternates
        # from the start).
        warmup = p - s - 1
        actions = [a for i in range(warmup) for a in _forward(s, p, i)]
        for k in range(m - warmup):
            actions += _forward(s, p, warmup + k) + _backward(s, p, k)
        actions += [a for k in range(m - warmup, m) for a in _backward(s, p, k)]
        schedules.append([*actions, Action("step")])
    return schedules


_GENERATORS: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, p: int, m: int) -> Schedule:
    """The named schedule ("gpipe" or "1f1b") for p stages and m micro-batches, validated."""
    if name not in _GENERATORS:
        raise ScheduleError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {name!r}")
    schedules = _GENERATORS[name](p, m)
    validate(schedules, m)
    return schedules


# -- validation ---------------------------------------------------------------------------

def _at(s: int, j: int, action: Action) -> str:
    return f"stage {s}, action {j} ({action})"


# Each transfer is glued to its compute (a receive right before, a send right after), so a
# stage never holds a message it cannot use yet: (offset of the compute, its kind).
_GLUE = {"recv_act": (+1, "forward"), "send_act": (-1, "forward"),
         "recv_grad": (+1, "backward"), "send_grad": (-1, "backward")}


def _check_stage(s: int, p: int, m: int, actions: Sequence[Action]) -> None:
    """Everything one stage's list must satisfy on its own."""
    def neighbour(j: int) -> Action | None:
        return actions[j] if 0 <= j < len(actions) else None

    done: dict[str, set[int]] = {"forward": set(), "backward": set()}
    for j, a in enumerate(actions):
        if not isinstance(a, Action):
            raise ScheduleError(f"stage {s}, action {j}: must be an Action, got {a!r}")
        where = _at(s, j, a)
        if a.kind == "step":
            if j != len(actions) - 1:
                raise ScheduleError(f"{where}: step must be the stage's last action, "
                                    f"{len(actions) - 1 - j} action(s) follow it")
            continue
        i = a.micro_batch
        if i >= m:
            raise ScheduleError(f"{where}: micro-batch out of range, there are {m} (0..{m - 1})")
        if a.kind in ("recv_act", "send_grad") and s == 0:
            raise ScheduleError(f"{where}: stage 0 has no stage before it to talk to")
        if a.kind in ("send_act", "recv_grad") and s == p - 1:
            raise ScheduleError(f"{where}: the last stage has no stage after it to talk to")
        if a.kind in _GLUE:
            step, compute = _GLUE[a.kind]
            if neighbour(j + step) != Action(compute, i):
                side = "right before" if step > 0 else "right after"
                raise ScheduleError(f"{where}: must come {side} {compute} {i}")
            continue
        if a.kind == "backward" and i not in done["forward"]:
            raise ScheduleError(f"{where}: its forward {i} has not run")
        if i in done[a.kind]:
            raise ScheduleError(f"{where}: {a.kind} {i} already ran")
        done[a.kind].add(i)
        recv, send = (("recv_act", "send_act") if a.kind == "forward"
                      else ("recv_grad", "send_grad"))
        needs_recv = s > 0 if a.kind == "forward" else s < p - 1
        needs_send = s < p - 1 if a.kind == "forward" else s > 0
        if needs_recv and neighbour(j - 1) != Action(recv, i):
            raise ScheduleError(f"{where}: must come right after {recv} {i}, its input is "
                                f"on stage {s - 1 if a.kind == 'forward' else s + 1}")
        if needs_send and neighbour(j + 1) != Action(send, i):
            raise ScheduleError(f"{where}: must be followed by {send} {i}, stage "
                                f"{s + 1 if a.kind == 'forward' else s - 1} waits for it")
    for kind in ("forward", "backward"):
        missing = sorted(set(range(m)) - done[kind])
        if missing:
            raise ScheduleError(f"stage {s}: no {kind} of micro-batch(es) "
                                f"{', '.join(map(str, missing))} (each of 0..{m - 1} runs once)")
    if not actions or actions[-1].kind != "step":
        raise ScheduleError(f"stage {s}: must end with one step")


# (sender, receiver, send kind, recv kind) of every channel between stages s and s+1
def _channels(p: int) -> list[tuple[int, int, str, str]]:
    return ([(s, s + 1, "send_act", "recv_act") for s in range(p - 1)]
            + [(s + 1, s, "send_grad", "recv_grad") for s in range(p - 1)])


def _check_fifo(schedules: Sequence[Sequence[Action]]) -> None:
    # The per-stage checks already make every channel carry each micro-batch once each way
    # (every send and receive is glued to a compute that runs once), so sends and receives
    # match as sets; what is left is their order.
    for src, dst, send, recv in _channels(len(schedules)):
        sent = [a.micro_batch for a in schedules[src] if a.kind == send]
        got = [(j, a) for j, a in enumerate(schedules[dst]) if a.kind == recv]
        for k, (j, a) in enumerate(got):
            if a.micro_batch != sent[k]:
                raise ScheduleError(
                    f"{_at(dst, j, a)}: the channel from stage {src} is FIFO and its message "
                    f"number {k} is {send.split('_')[1]} {sent[k]} (stage {src} sends "
                    f"{' '.join(map(str, sent))}; stage {dst} receives "
                    f"{' '.join(str(b.micro_batch) for _, b in got)})"
                )


@dataclass(frozen=True, slots=True)
class _Run:
    ends: list[list[float]]  # per stage, the finish time of each action that ran
    stuck: list[tuple[int, int]]  # (stage, index of the receive it waits on)


def _run(schedules: Sequence[Sequence[Action]], forward: float, backward: float,
         comm: float) -> _Run:
    """Runs the schedule as the transport would: sends queue, receives wait for their send.

    Exact for this model: a stage's only dependencies are its own previous action and, for
    a receive, the matching send, so visiting stages in any order gives the same times.
    """
    p = len(schedules)
    queues: dict[tuple[int, int], deque[float]] = {}  # (from, to): send finish times
    ends: list[list[float]] = [[] for _ in range(p)]
    clock = [0.0] * p
    cost = {"forward": forward, "backward": backward}
    moved = True
    while moved:
        moved = False
        for s in range(p):
            actions = schedules[s]
            while len(ends[s]) < len(actions):
                a = actions[len(ends[s])]
                start = clock[s]
                if a.kind.startswith("recv"):
                    peer = s - 1 if a.kind == "recv_act" else s + 1
                    queue = queues.get((peer, s))
                    if not queue:
                        break
                    start = max(start, queue.popleft() + comm)
                clock[s] = start + cost.get(a.kind, 0.0)
                if a.kind.startswith("send"):
                    peer = s + 1 if a.kind == "send_act" else s - 1
                    queues.setdefault((s, peer), deque()).append(clock[s])
                ends[s].append(clock[s])
                moved = True
    stuck = [(s, len(ends[s])) for s in range(p) if len(ends[s]) < len(schedules[s])]
    return _Run(ends, stuck)


def validate(schedules: Sequence[Sequence[Action]], m: int) -> None:
    """Raises ScheduleError, naming the stage and the action, unless the schedule keeps the
    conventions (module docstring) for m micro-batches, every channel's receives come in the
    order of its sends, and it runs to the end without deadlock."""
    p = len(schedules)
    _check_sizes(p, m)
    for s, actions in enumerate(schedules):
        _check_stage(s, p, m, actions)
    _check_fifo(schedules)
    run = _run(schedules, 0.0, 0.0, 0.0)
    if run.stuck:
        waits = []
        for s, j in run.stuck:
            a = schedules[s][j]
            peer = s - 1 if a.kind == "recv_act" else s + 1
            sent = "send_act" if a.kind == "recv_act" else "send_grad"
            waits.append(f"{_at(s, j, a)} waits for stage {peer}'s {sent} {a.micro_batch}")
        raise ScheduleError("deadlock: " + "; ".join(waits))


# -- simulation ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Simulation:
    """What `simulate` measured, per stage and overall (times in the caller's cost unit)."""

    busy: tuple[float, ...]  # time each stage spent in forward/backward
    makespan: float  # when the last stage finished its step
    peak_activations: tuple[int, ...]  # most micro-batches forwarded and not yet backwarded

    @property
    def bubble(self) -> tuple[float, ...]:
        """Idle share of each stage: 1 - busy / makespan."""
        if self.makespan == 0:
            return tuple(0.0 for _ in self.busy)
        return tuple(1.0 - b / self.makespan for b in self.busy)


def simulate(schedules: Sequence[Sequence[Action]], forward: float = 1.0,
             backward: float = 2.0, comm: float = 0.0) -> Simulation:
    """Times a schedule: forward and backward cost `forward` and `backward`, sends and step
    cost nothing, a receive starts no earlier than `comm` after its send finished. Validates
    first (m is one more than the highest micro-batch any action names).

    >>> simulate(gpipe(2, 4), forward=1.0, backward=1.0).makespan  # (m + p - 1) * (f + b)
    10.0
    """
    for name, value in (("forward", forward), ("backward", backward), ("comm", comm)):
        if value < 0:
            raise ScheduleError(f"simulate: {name} cost must be >= 0, got {value}")
    if not schedules:
        raise ScheduleError("simulate: needs at least one stage, got none")
    # the highest micro-batch named sets m, so a gap is reported as missing, not out of range
    m = 1 + max((a.micro_batch for actions in schedules for a in actions
                 if isinstance(a, Action)), default=0)
    validate(schedules, m)
    run = _run(schedules, forward, backward, comm)
    busy = []
    peaks = []
    for actions in schedules:
        held = peak = 0
        for a in actions:
            held += {"forward": 1, "backward": -1}.get(a.kind, 0)
            peak = max(peak, held)
        peaks.append(peak)
        busy.append(sum(forward if a.kind == "forward" else backward
                        for a in actions if a.kind in ("forward", "backward")))
    makespan = max(ends[-1] for ends in run.ends)
    return Simulation(tuple(busy), makespan, tuple(peaks))


# -- configuration ------------------------------------------------------------------------

def _divisors_near(n: int, k: int, at_least: int) -> list[int]:
    """The divisors of n closest to k from below and above, skipping those under at_least."""
    divisors = [d for d in range(max(1, at_least), n + 1) if n % d == 0]
    below = [d for d in divisors if d < k]
    above = [d for d in divisors if d > k]
    return below[-1:] + above[:1]


def check_pipeline(stages: int, micro_batches: int, schedule: str, batch_size: int,
                   n_blocks: int) -> None:
    """Raises ConfigError, naming the key and the fix, unless a pipeline run with these
    settings can be cut and scheduled: at least 2 stages and no more than the model's
    blocks, a known schedule, enough micro-batches for 1f1b, and a batch that splits evenly
    into micro-batches."""
    if stages < 2:
        raise ConfigError(f"runtime.stages: a pipeline needs at least 2 stages, got {stages}; "
                          f"for one stage use runtime.mode local")
    if schedule not in SCHEDULES:
        raise ConfigError(f"runtime.schedule: must be one of {', '.join(SCHEDULES)}, "
                          f"got {schedule!r}")
    if stages > n_blocks:
        raise ConfigError(f"runtime.stages: the model has {n_blocks} blocks; use at most "
                          f"{n_blocks} stages, got {stages}")
    if micro_batches < 1:
        raise ConfigError(f"runtime.micro_batches: must be >= 1, got {micro_batches}")
    if schedule == "1f1b" and micro_batches < stages:
        raise ConfigError(f"runtime.micro_batches: 1f1b needs at least one micro-batch per "
                          f"stage, got {micro_batches} for {stages} stages; raise "
                          f"runtime.micro_batches to at least {stages} or use gpipe")
    if batch_size % micro_batches:
        floor = stages if schedule == "1f1b" else 1
        options = _divisors_near(batch_size, micro_batches, floor)
        fix = (f"use runtime.micro_batches {' or '.join(map(str, options))}, or "
               if options else "")
        raise ConfigError(f"training.batch_size {batch_size} is not divisible by "
                          f"runtime.micro_batches {micro_batches}; {fix}make "
                          f"training.batch_size a multiple of {micro_batches}")
