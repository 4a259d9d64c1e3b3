"""The Python client of the job service (`narun coordinator`): submit jobs, follow their
events, ask their status, cancel them.

    async with Client("tcp://head:7700", keys="keys/") as client:
        job = await client.submit("configs/mlp.yaml", overrides=["training.steps=500"])
        async for event in client.events(job):
            print(event["event"], event.get("step"))
        print(await client.status(job))        # JobStatus(state='done', ...)

`events` follows a job to its final event and survives a dropped connection or a restarted
coordinator: it asks again from the last sequence number it saw, so no event is lost or
repeated. `SyncClient` offers the same calls without asyncio, for scripts and notebooks.
Everything it does is protocol messages (protocol/SPEC.md): `submit`, `status`, `jobs`,
`cancel`, `events`.

The client of the inference server (`narun serve`) is here too: `InferenceClient`
(narun.serve.client) streams generated tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq.asyncio

import narun
from narun.errors import ActorDiedError, NarunError, Refused, WaitTimeout
from narun.runtime.connect import service_channel
from narun.runtime.mailbox import Mailbox, new_id
from narun.serve.client import Done, GenerationError, InferenceClient, ServerUnavailable, Token
from protocol import message

DEFAULT_ADDRESS = "tcp://127.0.0.1:7700"
FINAL = ("done", "failed", "cancelled")

__all__ = ["Client", "CoordinatorUnavailable", "Done", "GenerationError", "InferenceClient",
           "JobNotFound", "JobStatus", "Refused", "ServerUnavailable", "SyncClient", "Token"]


class JobNotFound(NarunError):
    """The coordinator knows no job of that id."""


class CoordinatorUnavailable(NarunError):
    """The coordinator did not answer in time (not running, unreachable, or refusing this
    client's key)."""


@dataclass(frozen=True)
class JobStatus:
    job: str
    state: str  # queued, running, done, failed, cancelled
    step: int
    steps: int
    message: str  # why it failed, else empty
    name: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL


class Client:
    """An asyncio client of one job service. `address` defaults to $NARUN_COORDINATOR or
    tcp://127.0.0.1:7700; `keys`, this client's key directory (its pair, and the service's
    public key filed under the service's host in authorized/), is needed unless the
    service listens on loopback in plaintext. `timeout`: seconds any answer may take."""

    def __init__(self, address: str | None = None, keys: str | os.PathLike[str] | None = None,
                 timeout: float = 10.0, follow_idle: float = 5.0) -> None:
        self.address = address or os.environ.get("NARUN_COORDINATOR") or DEFAULT_ADDRESS
        if "://" not in self.address:
            from narun.runtime.hosts import tcp_address

            self.address = tcp_address(self.address, 7700, "coordinator address")
        self.keys = keys
        self.timeout = timeout
        self.follow_idle = follow_idle  # silence after which `events` asks again
        self._context: zmq.asyncio.Context | None = None
        self._mailbox: Mailbox | None = None

    async def __aenter__(self) -> Client:
        self._context = zmq.asyncio.Context()
        channel = service_channel(self._context, self.address, self.keys, 7700,
                                  "coordinator address")
        self._mailbox = Mailbox(channel, f"the coordinator at {self.address}").start()
        await self._call(message("hello", new_id(), role="client", rank=0,
                                 software=narun.__version__), "a welcome")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._mailbox is not None:
            self._mailbox.close()
        if self._context is not None:
            self._context.destroy(linger=0)

    # -- the calls ---------------------------------------------------------------------
    async def submit(self, config: str | os.PathLike[str] | dict[str, Any], *,
                     name: str | None = None, overrides: Sequence[str] = ()) -> str:
        """Queue a job (a YAML file, or a config dict) with `overrides` ("key=value"
        items, as --set); returns its id. A config the service refuses raises Refused
        with its reason. Relative data paths are resolved here, where they were written."""
        cfg = _load(config, overrides)
        data = cfg["data"]
        if data.get("path") is not None:
            data["path"] = str(Path(data["path"]).resolve())
        name = name or (Path(config).stem if not isinstance(config, dict)
                        else cfg["model"]["name"])
        answer = await self._call(message("submit", new_id(), name=name, config=cfg),
                                  "a submit")
        return str(answer["job"])

    async def status(self, job: str) -> JobStatus:
        return _status(await self._call(message("status", new_id(), job=job),
                                        f"the status of {job}"))

    async def list(self) -> list[JobStatus]:
        """Every job the service knows, oldest first."""
        answer = await self._call(message("jobs", new_id()), "the list of jobs")
        return [_status(j) for j in answer["jobs"]]

    async def cancel(self, job: str, reason: str = "cancelled by a client") -> JobStatus:
        """Stop a job: a running one drains to a checkpoint first (state `cancelled`)."""
        return _status(await self._call(message("cancel", new_id(), job=job, reason=reason),
                                        f"a cancel of {job}"))

    async def events(self, job: str, since: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The job's events from sequence number `since`, each a dict as `--json` prints
        it plus its `seq`; ends after the job's final event. A silence of `follow_idle`
        seconds (a dropped connection, a restarted coordinator, or a quiet job) makes it ask
        again from where it was; CoordinatorUnavailable once nothing has answered for
        `timeout` seconds in a row."""
        assert self._mailbox is not None, "use `async with Client(...)`"
        heard = time.monotonic()
        while True:
            request = message("events", new_id(), job=job, since=since)
            try:
                async for msg in self._mailbox.stream(request, timeout=self.follow_idle,
                                                      what=f"the events of {job}"):
                    heard = time.monotonic()
                    if not msg["events"]:
                        return
                    for event in msg["events"]:
                        if event.get("seq", -1) >= since:
                            since = event["seq"] + 1
                            yield dict(event)
            except Refused as exc:
                raise _typed(exc, job) from None
            except (WaitTimeout, ActorDiedError):
                if time.monotonic() - heard > max(self.timeout, self.follow_idle):
                    try:  # quiet, or gone? a status answers at once when it is there
                        await self.status(job)
                        heard = time.monotonic()
                    except CoordinatorUnavailable:
                        raise CoordinatorUnavailable(
                            f"the coordinator at {self.address} has not answered for "
                            f"{time.monotonic() - heard:.0f} s while following {job}") from None

    async def fetch_checkpoint(self, job: str, dest: str | os.PathLike[str]) -> Path:
        """Copy the job's newest checkpoint into `dest` (DEST/step-NNNNNN/, checked
        against its manifest's SHA-256s as narun.load does); its local path."""
        from narun.checkpoint import load_checkpoint

        newest = None
        async for event in self._stored_events(job):
            if event["event"] == "checkpoint":
                newest = Path(event["path"]).name
        if newest is None:
            raise JobNotFound(f"job {job} has written no checkpoint yet")
        target = Path(dest) / newest
        target.mkdir(parents=True, exist_ok=True)
        manifest = await self._fetch(job, f"checkpoints/{newest}/manifest.json",
                                     target / "manifest.json")
        for name in json.loads(manifest.read_text())["files"]:
            await self._fetch(job, f"checkpoints/{newest}/{name}", target / name)
        await asyncio.to_thread(load_checkpoint, target)  # refuses a corrupted copy, named
        return target

    async def _stored_events(self, job: str) -> AsyncIterator[dict[str, Any]]:
        """The events stored now (a running job's stream is left once they are in)."""
        events = self.events(job)
        try:
            while True:
                async with asyncio.timeout(self.follow_idle / 2):
                    yield await anext(events)
        except (StopAsyncIteration, TimeoutError):
            return
        finally:
            await events.aclose()

    async def _fetch(self, job: str, path: str, target: Path) -> Path:
        from narun.runtime.jobfiles import CHUNK, fetch_file

        return await fetch_file(
            lambda offset: self._call(message("file_get", new_id(), job=job, path=path,
                                              offset=offset, size=CHUNK), path), target)

    async def wait(self, job: str) -> JobStatus:
        """Follow the job to its end; its final status."""
        async for _ in self.events(job):
            pass
        return await self.status(job)

    # -- internals ---------------------------------------------------------------------
    async def _call(self, msg: Any, what: str) -> Any:
        assert self._mailbox is not None, "use `async with Client(...)`"
        try:
            return await self._mailbox.call(msg, timeout=self.timeout, what=what)
        except Refused as exc:
            raise _typed(exc, msg.get("job")) from None
        except (WaitTimeout, ActorDiedError) as exc:
            raise CoordinatorUnavailable(f"the coordinator at {self.address} did not answer "
                                         f"({exc}); is `narun coordinator` running there, and "
                                         f"does it admit this client's key?") from None


def _typed(exc: Refused, job: str | None) -> Exception:
    if exc.code == "not_found":
        return JobNotFound(f"no job {job!r} on the coordinator")
    return exc


def _status(fields: Any) -> JobStatus:
    return JobStatus(str(fields["job"]), str(fields["state"]), int(fields["step"]),
                     int(fields["steps"]), str(fields["message"]), str(fields.get("name", "")))


def _load(config: str | os.PathLike[str] | dict[str, Any],
          overrides: Sequence[str]) -> dict[str, Any]:
    import narun.models  # noqa: F401  (registers model fields, so model.* keys are checked)
    from narun.config import config_from_dict, load_config, to_dict

    if isinstance(config, dict):
        from narun.config import apply_overrides

        return to_dict(config_from_dict(apply_overrides(dict(config), list(overrides))))
    return to_dict(load_config(config, list(overrides)))


class SyncClient:
    """Client's calls without asyncio (scripts, notebooks): each runs on a private loop.

        client = SyncClient("tcp://head:7700")
        job = client.submit("configs/mlp.yaml")
        for event in client.events(job): ...
        client.close()
    """

    def __init__(self, address: str | None = None, keys: str | os.PathLike[str] | None = None,
                 timeout: float = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = Client(address, keys, timeout)
        self._loop.run_until_complete(self._client.__aenter__())

    def submit(self, config: str | os.PathLike[str] | dict[str, Any], *,
               name: str | None = None, overrides: Sequence[str] = ()) -> str:
        return self._loop.run_until_complete(self._client.submit(config, name=name,
                                                                 overrides=overrides))

    def status(self, job: str) -> JobStatus:
        return self._loop.run_until_complete(self._client.status(job))

    def list(self) -> list[JobStatus]:
        return self._loop.run_until_complete(self._client.list())

    def cancel(self, job: str, reason: str = "cancelled by a client") -> JobStatus:
        return self._loop.run_until_complete(self._client.cancel(job, reason))

    def wait(self, job: str) -> JobStatus:
        return self._loop.run_until_complete(self._client.wait(job))

    def fetch_checkpoint(self, job: str, dest: str | os.PathLike[str]) -> Path:
        return self._loop.run_until_complete(self._client.fetch_checkpoint(job, dest))

    def events(self, job: str, since: int = 0) -> Iterator[dict[str, Any]]:
        stream = self._client.events(job, since)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(stream.aclose())

    def close(self) -> None:
        self._loop.run_until_complete(self._client.__aexit__())
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
