"""The wire format: codec, message types and ZeroMQ transport helpers (see SPEC.md).

    from protocol import message, encode, decode
    frames = encode(message("token", 7, index=0, token=104, logprob=-0.25))
    assert decode(frames)["token"] == 104
"""

from protocol.codec import decode, encode, refusal
from protocol.curve import Authenticator, CurveClient, CurveServer
from protocol.dtypes import WIRE_DTYPES, BFloat16Array
from protocol.keys import (
    KeyPair,
    generate_keypair,
    load_allowed_keys,
    load_keypair,
    load_public_key,
)
from protocol.limits import DEFAULT_LIMITS, INLINE_LIMIT, Limits
from protocol.messages import (
    DONE_REASONS,
    ERROR_CODES,
    JOB_STATES,
    PROTOCOL_VERSION,
    ROLES,
    SCHEMAS,
    Field,
    Kind,
    Message,
    MessageSpec,
    error_message,
    message,
    reply,
    token_message,
)
from protocol.transport import DEFAULT_HWM, Channel, Incoming, open_channel

__all__ = [
    "DEFAULT_HWM",
    "DEFAULT_LIMITS",
    "DONE_REASONS",
    "ERROR_CODES",
    "INLINE_LIMIT",
    "JOB_STATES",
    "PROTOCOL_VERSION",
    "ROLES",
    "SCHEMAS",
    "WIRE_DTYPES",
    "Authenticator",
    "BFloat16Array",
    "Channel",
    "CurveClient",
    "CurveServer",
    "Field",
    "Incoming",
    "KeyPair",
    "Kind",
    "Limits",
    "Message",
    "MessageSpec",
    "decode",
    "encode",
    "error_message",
    "generate_keypair",
    "load_allowed_keys",
    "load_keypair",
    "load_public_key",
    "message",
    "open_channel",
    "refusal",
    "reply",
    "token_message",
]
