"""Byte-level tokenizer: token id = UTF-8 byte value, so every text round-trips losslessly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


class ByteTokenizer:
    """Encodes text as its UTF-8 bytes (ids 0..255); decodes any id sequence back to text.

    There are no special tokens: the vocabulary is exactly the 256 byte values.

        >>> tok = ByteTokenizer()
        >>> ids = tok.encode("héllo")
        >>> ids.tolist(), tok.decode(ids)
        ([104, 195, 169, 108, 108, 111], 'héllo')
    """

    vocab_size: int = 256

    def encode(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        """The UTF-8 bytes of `text` as a 1-D array (int64 by default; uint8 is 8x smaller)."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: expected str, got {type(text).__name__}")
        # surrogatepass: lone surrogates (legal in a Python str, not in UTF-8) still encode
        # instead of raising; decode maps them back through errors="replace".
        raw = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
        return raw.astype(dtype)

    def decode(self, ids: Any) -> str:
        """Text of a sequence of byte ids; byte sequences that are not valid UTF-8 decode to
        U+FFFD instead of raising (a model can emit any byte sequence)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Any) -> bytes:
        """The raw bytes of a sequence of ids (lossless, no UTF-8 interpretation)."""
        arr = _as_int_array(ids)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(
                f"ByteTokenizer.decode: token id {int(bad)} is outside the byte vocabulary "
                f"[0, {self.vocab_size})"
            )
        return arr.astype(np.uint8).tobytes()

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def _as_int_array(ids: Any) -> np.ndarray:
    if hasattr(ids, "numpy") and callable(ids.numpy):  # narun / torch tensors
        ids = ids.numpy()
    elif hasattr(ids, "get") and callable(ids.get) and not isinstance(ids, dict):  # CuPy
        ids = ids.get()
    if isinstance(ids, (bytes, bytearray, memoryview)):
        return np.frombuffer(ids, dtype=np.uint8)
    if not isinstance(ids, np.ndarray):
        ids = np.asarray(list(ids) if isinstance(ids, Iterable) else ids)
    if ids.dtype.kind not in "iub" and ids.size:
        raise TypeError(f"ByteTokenizer.decode: expected integer ids, got dtype {ids.dtype}")
    return ids.reshape(-1).astype(np.int64, copy=False)
