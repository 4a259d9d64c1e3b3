"""Streaming inference: the continuous-batching engine a server drives.

    >>> from narun.serve import Engine
    >>> engine = Engine(model, max_batch=8, prefill_chunk=64)
    >>> engine.add("req-1", prompt_ids, max_new_tokens=32, temperature=0.7, seed=1)
    >>> outputs = engine.step()
"""

from narun.serve.engine import Engine, Output

__all__ = ["Engine", "Output"]
