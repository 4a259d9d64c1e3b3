"""Job metrics for Prometheus: a registry fed by the `--json` events, and a tiny HTTP server.

The job service turns each job's events (the dicts `--json` prints: step, eval, checkpoint,
restart, host_lost, done, error, ...) into `Metrics.observe(job, event)` calls (a
`MetricsReporter(metrics, job)` teed beside the job's other reporters does that), and
serves `Metrics.render()` on `--metrics-port` with `serve_metrics`. The exposition is the
Prometheus text format 0.0.4, written here so that narun needs no client library:

    >>> m = Metrics()
    >>> m.observe("gpt-1", {"event": "step", "step": 3, "loss": 2.5, "lr": 3e-4})
    >>> print([l for l in m.render().splitlines() if l.startswith("narun_loss{")][0])
    narun_loss{job="gpt-1"} 2.5

Every series of a job carries the label `job`; restarts add `role`, step times `phase`.
Counters end in `_total` and only grow while the job is known; a job the service no longer
reports on is dropped with `forget(job)`, which is what bounds the registry's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsReporter", "serve_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PHASES = ("compute", "push", "wait", "pull")  # the coordinator's step `timings`
MAX_REQUEST = 8192  # bytes of request line and headers: a scrape needs a few hundred
TIMEOUT = 5.0  # seconds a client gets to send its request, and to take the reply


@dataclass(frozen=True)
class _Family:
    name: str
    kind: str  # counter or gauge
    help: str


_FAMILIES = [_Family(*f) for f in (
    ("narun_step", "gauge", "The job's last completed training step."),
    ("narun_steps_total", "counter",
     "Step events seen, steps redone after a rollback included."),
    ("narun_loss", "gauge", "Training loss of the last step (mean over trainers)."),
    ("narun_val_loss", "gauge", "Validation loss of the last evaluation."),
    ("narun_lr", "gauge", "Learning rate of the last step."),
    ("narun_samples_per_second", "gauge", "Training throughput of the last step, in samples."),
    ("narun_tokens_per_second", "gauge", "Training throughput of the last step, in tokens."),
    ("narun_step_phase_seconds", "gauge",
     "Time of the last step by phase (compute, push, wait, pull), mean over trainers."),
    ("narun_step_phase_seconds_total", "counter",
     "Time of all steps by phase (compute, push, wait, pull), mean over trainers."),
    ("narun_stale_pushes_total", "counter", "Gradients pushed against stale parameters."),
    ("narun_checkpoints_total", "counter", "Checkpoints written."),
    ("narun_restarts_total", "counter", "Processes restarted (or rolled back), by role."),
    ("narun_hosts_lost_total", "counter", "Hosts declared lost."),
    ("narun_errors_total", "counter", "Error events."),
    ("narun_jobs", "gauge", "Jobs known to the service, by state."),
    ("narun_messages_refused_total", "counter",
     "Protocol messages the control socket refused."),
)]
_KIND = {f.name: f.kind for f in _FAMILIES}

_Labels = tuple[tuple[str, str], ...]


class Metrics:
    """The metrics of every job the service reports on; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # job -> (metric, labels other than job) -> value
        self._jobs: dict[str, dict[tuple[str, _Labels], float]] = {}
        self._states: dict[str, int] = {}
        self._refused = 0

    def observe(self, job: str, event: Mapping[str, Any]) -> None:
        """Account for one event of `job`, a dict as `--json` prints it (with its `event`
        key). Events and fields it does not know are ignored, so new ones never break it."""
        kind = event.get("event")
        with self._lock:
            series = self._jobs.setdefault(job, {})

            def gauge(name: str, field: str, **labels: str) -> None:
                value = _number(event.get(field))
                if value is not None:
                    series[name, tuple(sorted(labels.items()))] = value

            def count(name: str, by: float = 1.0, **labels: str) -> None:
                key = (name, tuple(sorted(labels.items())))
                series[key] = series.get(key, 0.0) + by

            if kind == "step":
                gauge("narun_step", "step")
                count("narun_steps_total")
                gauge("narun_loss", "loss")
                gauge("narun_lr", "lr")
                gauge("narun_samples_per_second", "samples_per_s")
                gauge("narun_tokens_per_second", "tokens_per_s")
                timings = event.get("timings")
                if isinstance(timings, Mapping):
                    for phase in PHASES:
                        seconds = _number(timings.get(phase))
                        if seconds is not None:
                            series["narun_step_phase_seconds", (("phase", phase),)] = seconds
                            count("narun_step_phase_seconds_total", seconds, phase=phase)
                stale = _number(event.get("stale"))
                if stale:
                    count("narun_stale_pushes_total", stale)
            elif kind == "eval":
                gauge("narun_val_loss", "val_loss")
            elif kind == "checkpoint":
                count("narun_checkpoints_total")
            elif kind == "restart":
                count("narun_restarts_total", role=str(event.get("role", "unknown")))
            elif kind == "host_lost":
                count("narun_hosts_lost_total")
            elif kind == "error":
                count("narun_errors_total")
            elif kind in ("done", "resumed"):
                gauge("narun_step", "step")
                gauge("narun_val_loss", "val_loss")  # done's: the whole split, when run

    def set_jobs_by_state(self, counts: Mapping[str, int]) -> None:
        """How many jobs are in each state now (queued, running, ...); replaces the last."""
        with self._lock:
            self._states = {str(k): int(v) for k, v in counts.items()}

    def add_refused(self, n: int = 1) -> None:
        """Count `n` protocol messages the control socket refused."""
        with self._lock:
            self._refused += n

    def forget(self, job: str) -> None:
        """Drop every series of `job` (a finished job the service no longer lists)."""
        with self._lock:
            self._jobs.pop(job, None)

    def jobs(self) -> list[str]:
        """The jobs that have series now."""
        with self._lock:
            return sorted(self._jobs)

    def render(self) -> str:
        """Everything, in the Prometheus text exposition format 0.0.4."""
        samples: dict[str, list[tuple[_Labels, float]]] = {f.name: [] for f in _FAMILIES}
        with self._lock:
            for job, series in self._jobs.items():
                for (name, labels), value in series.items():
                    samples[name].append(((("job", job), *labels), value))
            samples["narun_jobs"] = [((("state", s),), float(n))
                                     for s, n in self._states.items()]
            samples["narun_messages_refused_total"] = [((), float(self._refused))]
        lines = []
        for f in _FAMILIES:
            lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
            lines.append(f"# TYPE {f.name} {f.kind}")
            for labels, value in sorted(samples[f.name]):
                lines.append(f"{f.name}{_labels(labels)} {_value(value)}")
        return "\n".join(lines) + "\n"


class MetricsReporter:
    """A Reporter (narun.events) that feeds one job's events to `metrics`: tee it beside
    the job's others, e.g. `TeeReporter(reporter, MetricsReporter(metrics, job))`."""

    def __init__(self, metrics: Metrics, job: str) -> None:
        self.metrics, self.job = metrics, job

    def start(self, total_steps: int, first_step: int) -> None:
        return None

    def emit(self, event: str, **fields: Any) -> None:
        self.metrics.observe(self.job, {"event": event, **fields})

    def close(self) -> None:
        return None  # the series stay for scrapes after the end; Metrics.forget drops them


def _number(value: Any) -> float | None:
    """A field's value as a float; the JSON reporter writes NaN and inf as strings."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: _Labels) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, escaped)) + "}"


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # counts read as counts
    return repr(value)


# -- the HTTP endpoint ---------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large"}


async def serve_metrics(metrics: Metrics, host: str = "127.0.0.1", port: int = 0, *,
                        timeout: float = TIMEOUT) -> asyncio.Server:
    """Serve `metrics.render()` at `GET /metrics` (HEAD too) over HTTP/1.1 on host:port
    (0: any free port; the bound one is `server.sockets[0].getsockname()[1]`). Other paths
    get 404, other methods 405, a malformed or oversized request 400 or 431. Each connection
    answers one request and is closed; a client gets `timeout` seconds to send its request
    and as many to take the reply, so a slow or silent client cannot hold it. Close the
    returned server to stop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, head_only = await _answer(metrics, reader, timeout)
            await _reply(writer, status, body, head_only, timeout)
        except (ConnectionError, TimeoutError):
            # The client left, or stopped reading: a plain close would keep the socket
            # until its unread reply drained, which may be never.
            writer.transport.abort()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout)

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST)


async def _answer(metrics: Metrics, reader: asyncio.StreamReader,
                  timeout: float) -> tuple[int, str, bool]:
    """The status and body for the request on `reader`, and whether it was a HEAD."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except TimeoutError:
        return 408, "request timed out\n", False
    except asyncio.LimitOverrunError:
        return 431, f"request head over {MAX_REQUEST} bytes\n", False
    except asyncio.IncompleteReadError:  # closed before a blank line ended the head
        return 400, "incomplete request\n", False
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, "expected: GET /metrics HTTP/1.1\n", False
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return 405, "only GET and HEAD\n", False
    head_only = method == b"HEAD"
    if target != b"/metrics":
        return 404, "metrics are at /metrics\n", head_only
    return 200, metrics.render(), head_only


async def _reply(writer: asyncio.StreamWriter, status: int, body: str, head_only: bool,
                 timeout: float) -> None:
    data = body.encode()
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    header = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(data)}\r\nConnection: close\r\n")
    if status == 405:
        header += "Allow: GET, HEAD\r\n"
    writer.write(header.encode() + b"\r\n" + (b"" if head_only else data))
    await asyncio.wait_for(writer.drain(), timeout)
