"""A client's connection to a narun service: the job service (narun.client.Client) or an
inference server (narun.serve.client.InferenceClient)."""

from __future__ import annotations

import os

import zmq.asyncio

from narun.runtime.hosts import host_port
from protocol import Channel, CurveClient, open_channel


def service_channel(context: zmq.asyncio.Context, address: str,
                    keys: str | os.PathLike[str] | None, default_port: int,
                    what: str) -> Channel:
    """A DEALER connected to the service at `address` (`what` names it in errors). With
    `keys`, this client's key directory, the connection is CURVE, and the service's public
    key is the one filed under its host in keys/authorized/. Nothing is queued for a
    service that is not there (ZMQ_IMMEDIATE): a request sent while it is down fails at
    its timeout instead of arriving twice later (a submit would run twice)."""
    curve = None
    if keys is not None:
        from protocol.keys import load_node_keys

        node = load_node_keys(keys)
        host = host_port(address, default_port, what)[0]
        curve = CurveClient(node.keypair, node.public_key_of(host))
    channel = open_channel(context, "dealer", connect=address, curve=curve)
    channel.socket.immediate = 1
    return channel
