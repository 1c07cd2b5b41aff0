"""Shard names: expanding a spec into shards, and reading one shard.

A shard name says what to read:

- a file path: a TFRecord file in the `tfscale.data.records` format;
- `range:A:B`: the integers A..B-1 (tests and benchmarks);
- `tfds:NAME:SPLIT[a%:b%]`: a slice of a TFDS split.

Example:

```python
shards = expand("range:100:25")  # 4 shards: range:0:25, ..., range:75:100
list(read("range:0:3"))          # [0, 1, 2]
```
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from tfscale.data.dispatcher import core

__all__ = [
    "expand",
    "read",
]


def expand(spec: str, count_elements: bool = False) -> list[core.ShardSpec]:
    """Shards of a spec: a file glob, `range:N:K` or `tfds:NAME:SPLIT:N`.

    Args:
      spec: the spec.
      count_elements: size file shards by their record count (read once)
        rather than their bytes; equalization needs element counts.

    Raises:
      ValueError: for a malformed spec or a glob matching no file.
    """
    if spec.startswith("range:"):
        total, size = _ints(spec, 2)
        return [
            core.ShardSpec(f"range:{start}:{min(start + size, total)}", min(size, total - start))
            for start in range(0, total, size)
        ]
    if spec.startswith("tfds:"):
        parts = spec.split(":")
        if len(parts) != 4 or not parts[3].isdigit() or not 1 <= int(parts[3]) <= 100:
            raise ValueError(f"Expected tfds:NAME:SPLIT:N with N in [1, 100]. Received: {spec!r}")
        _, name, split, count = parts
        edges = [round(100 * i / int(count)) for i in range(int(count) + 1)]
        return [
            core.ShardSpec(f"tfds:{name}:{split}[{a}%:{b}%]", b - a) for a, b in zip(edges, edges[1:])
        ]
    import tensorflow as tf  # Only file shards need TensorFlow.

    files = sorted(tf.io.gfile.glob(spec))
    if not files:
        raise ValueError(f"No file matches the shard glob {spec!r}")
    if count_elements:
        from tfscale.data import records

        return [core.ShardSpec(f, n) for f, n in zip(files, records.shard_counts(files))]
    return [core.ShardSpec(f, os.path.getsize(f)) for f in files]


def read(name: str) -> Iterator[Any]:
    """The elements of one shard: ints for `range:`, `(image, label)` otherwise."""
    if name.startswith("range:"):
        start, stop = _ints(name, 2)
        yield from range(start, stop)
        return
    if name.startswith("tfds:"):
        import tensorflow_datasets as tfds  # Heavy import, only for TFDS shards.

        _, dataset, split = name.split(":", 2)
        yield from tfds.as_numpy(tfds.load(dataset, split=split, as_supervised=True))
        return
    import tensorflow as tf  # Only file shards need TensorFlow.

    from tfscale.data import records

    parse = records.parse_fn((28, 28, 1))
    for serialized in tf.data.TFRecordDataset([name]):
        element = parse(serialized)
        yield {key: value.numpy() for key, value in element.items()}


def _ints(spec: str, count: int) -> list[int]:
    parts = spec.split(":")[1:]
    if len(parts) != count or not all(p.isdigit() for p in parts):
        raise ValueError(f"Expected {count} integers in {spec!r}")
    values = [int(p) for p in parts]
    if spec.startswith("range:") and values[1] < 1:
        raise ValueError(f"Shard size must be positive. Received: {spec!r}")
    return values
