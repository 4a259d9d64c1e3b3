"""Golden vectors: encoded messages every implementation must reproduce (SPEC.md, section 10).

``load(name)`` gives (frames, meaning); ``make_vectors`` writes and checks them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack

VECTOR_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """Every stored vector, sorted."""
    return sorted(p.stem for p in VECTOR_DIR.glob("*.msgpack"))


def load(name: str) -> tuple[list[bytes], dict[str, Any]]:
    """The frames of vector ``name`` (header first) and its JSON meaning."""
    frames = msgpack.unpackb((VECTOR_DIR / f"{name}.msgpack").read_bytes(), raw=False)
    meaning = json.loads((VECTOR_DIR / f"{name}.json").read_text())
    return frames, meaning
