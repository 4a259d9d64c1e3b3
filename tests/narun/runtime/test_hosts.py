"""Endpoints on this host: a Unix socket in a private directory, removed afterwards."""

from __future__ import annotations

import os
import stat

import zmq

from narun.runtime.hosts import local_endpoint, remove_local_endpoint


def test_a_local_endpoint_carries_messages_and_is_removed_after():
    endpoint = local_endpoint("ps-0")
    assert endpoint is not None and endpoint.startswith("ipc://")
    path = endpoint.removeprefix("ipc://")
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700  # only this user
    ctx = zmq.Context()
    try:
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        server.bind(endpoint)
        client.connect(endpoint)
        client.send(b"grads")
        assert server.recv_multipart()[1] == b"grads"
    finally:
        ctx.destroy(linger=0)
    remove_local_endpoint(endpoint)
    assert not os.path.exists(os.path.dirname(path))


def test_only_what_local_endpoint_made_is_removed(tmp_path):
    other = tmp_path / "sockets"
    other.mkdir()
    remove_local_endpoint(f"ipc://{other}/ps-0")
    remove_local_endpoint("tcp://127.0.0.1:7800")
    assert other.exists()


def test_a_temporary_directory_too_long_for_a_unix_socket_gives_none(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert local_endpoint("ps-0") is None
    assert os.listdir(deep) == []  # the directory it tried is gone
