"""Logging setup. The library only asks for loggers; the CLI calls `configure` once.

Console rendering on a TTY, JSON lines otherwise, written to stderr so that stdout stays
free for `--json` events and generated text.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(json_lines: bool | None = None, level: str = "info") -> None:
    """Route structlog to stderr: console on a TTY, JSON lines otherwise (or as forced)."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer = (structlog.processors.JSONRenderer() if json_lines
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # sys.stderr as it is at each log call, not at configure(): whoever replaced it since
    # (pytest's capture, a redirect) gets the lines, and a closed replacement never does.
    return structlog.PrintLogger(file=sys.stderr)
