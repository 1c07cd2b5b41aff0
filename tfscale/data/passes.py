"""A dataset repeated as numbered passes, each shuffled by a seed of its own.

`Dataset.shuffle(...).repeat()` reshuffles every pass from the iterator's
own state, so a run resumed at element `n` has to read the `n` elements
before it again to find where it was (and the order of the passes after
the first is not promised to match). `stream` numbers the passes instead:
pass `p` is shuffled with a seed derived from `(seed, p)` only, so the
stream from element `n` starts at pass `n // count` and skips only
`n % count` elements of it, and equals the full stream after its first
`n` elements. `seeded_shuffle` is the shuffle with a seed tensor under
both, also used for the dispatcher's per-shard shuffles.

Example:

```python
train = passes.stream(split.dataset, count=24000, shuffle_buffer=2048, seed=0)
resumed = passes.stream(split.dataset, count=24000, shuffle_buffer=2048, seed=0, start=5 * 24000 + 96)
```
"""

from __future__ import annotations

from typing import Union

import tensorflow as tf

__all__ = [
    "seeded_shuffle",
    "stream",
]

# Pass seeds: seed * _PASS_SEED_STRIDE + pass (distinct for every pass below it).
_PASS_SEED_STRIDE = 1_000_003
_NO_END = 2**62


def seeded_shuffle(
    dataset: tf.data.Dataset, buffer: int, seed: Union[int, tf.Tensor]
) -> tf.data.Dataset:
    """`dataset.shuffle(buffer)` with a seed that may be a tensor (`Dataset.shuffle` takes ints).

    The same seed gives the same order every time.
    """
    specs = tf.nest.flatten(dataset.element_spec)
    seed = tf.cast(seed, tf.int64)
    variant = tf.raw_ops.ShuffleDataset(
        input_dataset=tf.data.experimental.to_variant(dataset),
        buffer_size=tf.constant(buffer, tf.int64),
        seed=seed,
        seed2=seed + 1,  # never both 0, which would mean "random"
        output_types=[s.dtype for s in specs],
        output_shapes=[s.shape for s in specs],
        reshuffle_each_iteration=False,
    )
    return tf.data.experimental.from_variant(variant, dataset.element_spec)


def stream(
    dataset: tf.data.Dataset, count: int, shuffle_buffer: int, seed: int, start: int = 0
) -> tf.data.Dataset:
    """`dataset` repeated without end as seeded passes, from element `start` on.

    Args:
      dataset: one pass (finite, deterministic).
      count: its elements.
      shuffle_buffer: each pass goes through a shuffle buffer of this many
        elements (0: in `dataset`'s order).
      seed: the run's seed; pass `p` is shuffled with `seed * 1000003 + p`.
      start: elements of the stream to leave out.

    Raises:
      ValueError: for a `count` below 1, or a negative `shuffle_buffer` or `start`.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1. Received: count={count}")
    if shuffle_buffer < 0 or start < 0:
        raise ValueError(
            "shuffle_buffer and start must be >= 0. Received: "
            f"shuffle_buffer={shuffle_buffer}, start={start}"
        )
    first, offset = divmod(start, count)

    def one_pass(number: tf.Tensor) -> tf.data.Dataset:
        if not shuffle_buffer:
            return dataset
        return seeded_shuffle(dataset, shuffle_buffer, seed * _PASS_SEED_STRIDE + number)

    passes = tf.data.Dataset.range(first, _NO_END).flat_map(one_pass)
    return passes.skip(offset) if offset else passes
