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

    The transport also sets ZeroMQ's MAXMSGSIZE (a limit on each frame, not on the message)
    to ``max_message_bytes``, so a peer that sends a larger frame is disconnected before the
    frame is buffered, and sizes each socket's receive high-water mark from
    ``max_queued_bytes`` (``receive_hwm``), which bounds what ZeroMQ holds per connection
    for messages not yet read (SPEC.md section 8).
    """

    max_message_bytes: int = 1 << 30  # header + all buffer frames
    max_header_bytes: int = 16 << 20  # the msgpack header (inline tensors included)
    max_frames: int = 4096  # buffer frames after the header
    max_ndim: int = 32  # dims of one tensor
    max_items: int = 1 << 16  # entries of one msgpack array or map in the header
    max_depth: int = 32  # nesting of plain data (map fields)
    max_queued_bytes: int = 4 << 30  # received, unread messages ZeroMQ holds per connection

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "max_frames", "max_ndim",
                     "max_items", "max_depth", "max_queued_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Limits.{name}: expected a positive int, got {value!r}")
        if self.max_header_bytes > self.max_message_bytes:
            raise ConfigError(
                f"Limits.max_header_bytes ({self.max_header_bytes}) must not exceed "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        if self.max_queued_bytes < 2 * self.max_message_bytes:
            raise ConfigError(
                f"Limits.max_queued_bytes ({self.max_queued_bytes}) must be at least "
                f"2 * max_message_bytes ({2 * self.max_message_bytes}): one message queued "
                f"and one arriving"
            )

    def receive_hwm(self, hwm: int) -> int:
        """ZeroMQ's receive high-water mark for a socket asked to queue ``hwm`` messages:
        at most ``hwm`` (0: no count of its own, as in ZeroMQ), and low enough that the
        queued messages plus the one arriving fit ``max_queued_bytes``
        ((rcvhwm + 1) * max_message_bytes <= max_queued_bytes).

        >>> Limits().receive_hwm(64), Limits(max_message_bytes=1 << 20).receive_hwm(64)
        (3, 64)
        """
        fit = self.max_queued_bytes // self.max_message_bytes - 1  # >= 1, see __post_init__
        return fit if hwm <= 0 else min(hwm, fit)


DEFAULT_LIMITS = Limits()
