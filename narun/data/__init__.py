"""Data: a byte tokenizer, text and array datasets, and seeded samplers sharded by rank.

    >>> from narun.data import TextDataset, WindowSampler
    >>> train, val = TextDataset.splits(seq_len=128)   # CPython's own docs text
    >>> sampler = WindowSampler(len(train), batch_size=16, seed=0)
    >>> x, y = train.batch(sampler.offsets(step=0))    # int64 (16, 128), y = x shifted by one
"""

from narun.data._arrays import ArrayDataset, class_prompts, load_arrays, make_classification_npz
from narun.data._augment import AUGMENTATIONS, augment_images
from narun.data._sampler import ShardedSampler, WindowSampler
from narun.data._shapes import make_shapes_npz, render_shapes, shape_prompts
from narun.data._text import TextDataset, default_corpus, load_corpus
from narun.data._tokenizer import ByteTokenizer

__all__ = [
    "AUGMENTATIONS", "ArrayDataset", "ByteTokenizer", "ShardedSampler", "TextDataset",
    "WindowSampler", "augment_images", "class_prompts", "default_corpus", "load_arrays",
    "load_corpus", "make_classification_npz", "make_shapes_npz", "render_shapes",
    "shape_prompts",
]
