"""narun.metrics: the events become Prometheus series, read back with prometheus_client's own
parser, over real HTTP."""

import asyncio
import math
import urllib.error
import urllib.request

import pytest

from narun.events import ListReporter, TeeReporter
from narun.metrics import Metrics, MetricsReporter, serve_metrics

parser = pytest.importorskip("prometheus_client.parser")

STEP = {"event": "step", "step": 7, "loss": 2.25, "lr": 3e-4, "samples_per_s": 1500.5,
        "timings": {"compute": 0.02, "push": 0.005, "wait": 0.001, "pull": 0.004},
        "stale": 2}


def parse(text):
    """{(sample name, ((label, value), ...)): value}, and the families' types."""
    samples, types = {}, {}
    for family in parser.text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples, types


def test_events_become_series_with_the_events_values():
    m = Metrics()
    m.observe("j1", {"event": "step", "step": 6, "loss": 2.5, "lr": 3e-4,
                     "samples_per_s": 1000.0,
                     "timings": {"compute": 0.01, "push": 0.004, "wait": 0.0, "pull": 0.002}})
    m.observe("j1", STEP)
    m.observe("j1", {"event": "eval", "step": 7, "val_loss": 2.5})
    m.observe("j1", {"event": "checkpoint", "step": 7, "path": "/x"})
    m.observe("j1", {"event": "restart", "role": "trainer", "rank": 1, "reason": "exit 9"})
    m.observe("j1", {"event": "restart", "role": "trainer", "rank": 0, "reason": "exit 9"})
    m.observe("j1", {"event": "restart", "role": "ps", "rank": 0, "reason": "exit 9"})
    m.observe("j1", {"event": "host_lost", "host": "node2", "reason": "silent"})
    m.observe("j1", {"event": "placement", "hosts": [], "processes": []})  # not a metric
    m.observe("j2", {"event": "step", "step": 1, "loss": 4.0, "lr": 1e-3,
                     "tokens_per_s": 9000.0})
    m.observe("j2", {"event": "error", "message": "boom"})
    m.set_jobs_by_state({"running": 2, "queued": 1})
    m.set_jobs_by_state({"running": 1, "done": 1})  # replaces: queued is gone
    m.add_refused()
    m.add_refused(3)
    samples, types = parse(m.render())
    j1, j2 = (("job", "j1"),), (("job", "j2"),)
    expected = {
        ("narun_step", j1): 7, ("narun_steps_total", j1): 2, ("narun_loss", j1): 2.25,
        ("narun_lr", j1): 3e-4, ("narun_samples_per_second", j1): 1500.5,
        ("narun_val_loss", j1): 2.5, ("narun_checkpoints_total", j1): 1,
        ("narun_stale_pushes_total", j1): 2, ("narun_hosts_lost_total", j1): 1,
        ("narun_restarts_total", (("job", "j1"), ("role", "ps"))): 1,
        ("narun_restarts_total", (("job", "j1"), ("role", "trainer"))): 2,
        ("narun_step", j2): 1, ("narun_steps_total", j2): 1, ("narun_loss", j2): 4.0,
        ("narun_lr", j2): 1e-3, ("narun_tokens_per_second", j2): 9000.0,
        ("narun_errors_total", j2): 1,
        ("narun_jobs", (("state", "done"),)): 1, ("narun_jobs", (("state", "running"),)): 1,
        ("narun_messages_refused_total", ()): 4,
    }
    for phase, last, before in (("compute", 0.02, 0.01), ("push", 0.005, 0.004),
                                ("wait", 0.001, 0.0), ("pull", 0.004, 0.002)):
        labels = (("job", "j1"), ("phase", phase))
        expected["narun_step_phase_seconds", labels] = last
        expected["narun_step_phase_seconds_total", labels] = pytest.approx(last + before)
    assert samples == expected
    assert types["narun_restarts"] == "counter" and types["narun_loss"] == "gauge"
    assert types["narun_messages_refused"] == "counter" and types["narun_jobs"] == "gauge"


def test_every_family_has_help_and_type_and_counters_end_in_total():
    text = Metrics().render()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert names == helps and len(names) == len(set(names)) > 10
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            assert name.startswith("narun_")
            assert name.endswith("_total") == (kind == "counter"), line


def test_labels_are_escaped_and_read_back_as_given():
    m = Metrics()
    job = 'we"ird\\job\nname'
    m.observe(job, {"event": "restart", "role": 'r"\\', "rank": 0, "reason": "x"})
    samples, _ = parse(m.render())
    assert samples["narun_restarts_total", (("job", job), ("role", 'r"\\'))] == 1


def test_nan_and_inf_as_the_json_reporter_writes_them():
    m = Metrics()
    m.observe("j", {"event": "step", "step": 1, "loss": "nan", "lr": 0.1,
                    "samples_per_s": float("inf")})
    m.observe("j", {"event": "eval", "step": 1, "val_loss": None})  # no value: no series
    samples, _ = parse(m.render())
    assert math.isnan(samples["narun_loss", (("job", "j"),)])
    assert samples["narun_samples_per_second", (("job", "j"),)] == math.inf
    assert ("narun_val_loss", (("job", "j"),)) not in samples


def test_forget_drops_only_that_jobs_series():
    m = Metrics()
    m.observe("a", STEP)
    m.observe("b", STEP)
    m.forget("a")
    m.forget("never-seen")
    samples, _ = parse(m.render())
    assert {dict(labels).get("job") for _, labels in samples} == {"b", None}
    assert m.jobs() == ["b"]


# -- over HTTP ------------------------------------------------------------------------------

def get(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


async def raw(port, data, read=True):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await reader.read() if read else b""
    writer.close()
    return reply


@pytest.fixture
async def served():
    m = Metrics()
    server = await serve_metrics(m, "127.0.0.1", 0, timeout=0.5)
    yield m, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.mark.timeout(20)
async def test_a_scrape_over_http_parses_to_the_fed_values(served):
    m, port = served
    m.observe("j1", STEP)
    status, content_type, body = await asyncio.to_thread(get, port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples, _ = parse(body)
    assert samples["narun_loss", (("job", "j1"),)] == 2.25
    m.observe("j1", {**STEP, "step": 8, "loss": 2.0})  # each scrape renders what is now
    samples, _ = parse((await asyncio.to_thread(get, port))[2])
    assert samples["narun_loss", (("job", "j1"),)] == 2.0
    assert samples["narun_steps_total", (("job", "j1"),)] == 2


@pytest.mark.timeout(20)
async def test_other_paths_methods_and_garbage_get_errors_and_it_keeps_serving(served):
    m, port = served
    m.observe("j1", STEP)
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(get, port, "/nope")
    assert info.value.code == 404
    assert (await raw(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.1 405 ")
    assert (await raw(port, b"\x00\xff\xfegarbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"GET /metrics\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)).startswith(
        b"HTTP/1.1 431 ")
    head = await raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    await raw(port, b"GET /met", read=False)  # gone half way through its request line
    status, _, body = await asyncio.to_thread(get, port)
    assert status == 200 and parse(body)[0]["narun_loss", (("job", "j1"),)] == 2.25


@pytest.mark.timeout(20)
async def test_a_silent_client_is_timed_out_and_does_not_hold_up_others(served):
    _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
    await writer.drain()
    status, _, _ = await asyncio.to_thread(get, port)  # served meanwhile
    assert status == 200
    reply = await asyncio.wait_for(reader.read(), 5)  # the server's 0.5 s, then closed
    assert reply.startswith(b"HTTP/1.1 408 ")
    writer.close()


def test_a_reporter_teed_beside_a_jobs_others_feeds_its_events():
    m = Metrics()
    shown = ListReporter()
    reporter = TeeReporter(shown, MetricsReporter(m, "job-7"))
    reporter.start(10, 0)
    reporter.emit("step", step=1, loss=3.5, lr=0.01, samples_per_s=100.0)
    reporter.emit("restart", role="trainer", rank=0, reason="exit 1", step=1)
    reporter.close()
    samples, _ = parse(m.render())
    job = (("job", "job-7"),)
    assert samples["narun_loss", job] == 3.5 and samples["narun_step", job] == 1
    assert samples["narun_restarts_total", (*job, ("role", "trainer"))] == 1
    assert [e["event"] for e in shown.events] == ["step", "restart"]
