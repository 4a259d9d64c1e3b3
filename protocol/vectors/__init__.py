"""Golden vectors: encoded messages every implementation must reproduce (SPEC.md, section 10).

``load(name)`` gives (frames, meaning); ``load_decoding()`` the decoder vectors (frames no
encoder writes, and what a decoder must answer); ``make_vectors`` writes and checks both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack

VECTOR_DIR = Path(__file__).resolve().parent
DECODING = VECTOR_DIR / "decoding.json"


def names() -> list[str]:
    """Every stored vector, sorted."""
    return sorted(p.stem for p in VECTOR_DIR.glob("*.msgpack"))


def load(name: str) -> tuple[list[bytes], dict[str, Any]]:
    """The frames of vector ``name`` (header first) and its JSON meaning."""
    frames = msgpack.unpackb((VECTOR_DIR / f"{name}.msgpack").read_bytes(), raw=False)
    meaning = json.loads((VECTOR_DIR / f"{name}.json").read_text())
    return frames, meaning


def load_decoding() -> dict[str, dict[str, tuple[list[bytes], Any]]]:
    """``{"refused": {name: (frames, reply)}, "accepted": {name: (frames, meaning)}}``:
    reply is ``{"code", "id"}`` or None (no answer), meaning as in ``load``."""
    stored = json.loads(DECODING.read_text())
    return {kind: {name: ([bytes.fromhex(f) for f in v["frames"]],
                          v["reply" if kind == "refused" else "meaning"])
                   for name, v in entries.items()}
            for kind, entries in stored.items()}
