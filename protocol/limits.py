"""Size limits that every decoder applies before it allocates anything (SPEC.md, "Limits")."""

from __future__ import annotations

from dataclasses import dataclass

from narun.errors import ConfigError

#: Tensors of fewer bytes travel inline in the header; the rest as their own frame. This is
#: also pyzmq's copy threshold: below it zero-copy sends cost more than copying.
INLINE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What a peer accepts; anything beyond is refused with a ProtocolError.

    The transport also sets ZeroMQ's MAXMSGSIZE to ``max_message_bytes``, so a peer that
    sends a larger frame is disconnected before the frame is buffered.
    """

    max_message_bytes: int = 1 << 30  # header + all buffer frames
    max_header_bytes: int = 16 << 20  # the msgpack header (inline tensors included)
    max_frames: int = 4096  # buffer frames after the header
    max_ndim: int = 32  # dims of one tensor
    max_items: int = 1 << 16  # entries of one msgpack array or map in the header
    max_depth: int = 32  # nesting of plain data (map fields)

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "max_frames", "max_ndim",
                     "max_items", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Limits.{name}: expected a positive int, got {value!r}")
        if self.max_header_bytes > self.max_message_bytes:
            raise ConfigError(
                f"Limits.max_header_bytes ({self.max_header_bytes}) must not exceed "
                f"max_message_bytes ({self.max_message_bytes})"
            )


DEFAULT_LIMITS = Limits()
