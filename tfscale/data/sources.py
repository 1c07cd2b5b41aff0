"""Input sources by name: the embedded synthetic set, TFRecord files, TFDS.

A source spec is a string:

- `"synthetic"`: the embedded digits-like set (`tfscale.data.synthetic`).
- `"tfrecord:PATTERN"`: files in the `tfscale.data.records` format; `{split}`
  in the pattern is replaced by the split name.
- `"tfds:NAME"`: a TensorFlow Datasets builder with `image` and `label`
  features (e.g. `tfds:mnist`); prepared data must be present in
  `tfds_data_dir` unless `download=True`.

Example:

```python
split = sources.load_split("synthetic", "train")
split.num_examples, split.files[:1]  # 24000, ['.../synthetic_digits-train.tfrecord-00000-of-00016']
for image, label in split.dataset.take(1): ...
```
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import tensorflow as tf

from tfscale.data import records
from tfscale.data import synthetic

__all__ = [
    "SOURCE_KINDS",
    "SplitData",
    "load_split",
]

SOURCE_KINDS = ("synthetic", "tfrecord:PATTERN", "tfds:NAME")
_IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class SplitData:
    """One split of a source, unbatched.

    Attributes:
      dataset: `(image, label)` pairs; images float32 in [0, 1].
      num_examples: the number of elements.
      image_shape: shape of one image, e.g. `(28, 28, 1)`.
      num_classes: number of label values.
      files: the shard files (empty for TFDS sources).
    """

    dataset: tf.data.Dataset
    num_examples: int
    image_shape: tuple[int, ...]
    num_classes: int
    files: tuple[str, ...] = ()


def load_split(
    source: str,
    split: str,
    *,
    cache_dir: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    download: bool = False,
) -> SplitData:
    """Loads one split of a source spec.

    Args:
      source: `"synthetic"`, `"tfrecord:PATTERN"` or `"tfds:NAME"`.
      split: split name, e.g. `"train"`, `"test"`, or a TFDS slice like
        `"train[:10%]"`.
      cache_dir: where the synthetic set is written (default
        `synthetic.default_cache_dir()`).
      tfds_data_dir: TFDS data directory.
      download: let TFDS download and prepare the data.

    Raises:
      ValueError: for an unknown source kind, or a pattern matching no file.
    """
    if source == "synthetic":
        files = synthetic.ensure_shards(cache_dir, split)
        return _from_files(files, synthetic.SPLITS[split][0])
    if source.startswith("tfrecord:"):
        pattern = source[len("tfrecord:"):].replace("{split}", split)
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise ValueError(f"No file matches {pattern!r} (source={source!r}, split={split!r})")
        return _from_files(files, sum(records.count(f) for f in files))
    if source.startswith("tfds:") and len(source) > len("tfds:"):
        return _from_tfds(source[len("tfds:"):], split, tfds_data_dir, download)
    raise ValueError(f"Unknown data source {source!r}. Valid sources: {', '.join(SOURCE_KINDS)}")


def _from_files(files: list[str], num_examples: int) -> SplitData:
    parse = records.parse_fn(_IMAGE_SHAPE)

    def to_pair(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        element = parse(serialized)
        return element["image"], element["label"]

    dataset = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(4, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    dataset = dataset.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)
    return SplitData(dataset, num_examples, _IMAGE_SHAPE, 10, tuple(files))


def _from_tfds(name: str, split: str, data_dir: Optional[str], download: bool) -> SplitData:
    import tensorflow_datasets as tfds  # Heavy import, only for TFDS sources.

    dataset, info = tfds.load(
        name,
        split=split,
        data_dir=data_dir,
        download=download,
        as_supervised=True,
        shuffle_files=False,
        with_info=True,
    )
    missing = {"image", "label"} - set(info.features.keys())
    if missing:
        raise ValueError(
            f"tfds:{name} needs 'image' and 'label' features; missing {sorted(missing)}"
        )
    dataset = dataset.map(
        lambda image, label: (tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return SplitData(
        dataset,
        _tfds_num_examples(info, split, dataset),
        tuple(info.features["image"].shape),
        int(info.features["label"].num_classes),
    )


def _tfds_num_examples(info: Any, split: str, dataset: tf.data.Dataset) -> int:
    """The split size from the dataset info, else from the dataset itself."""
    try:
        return int(info.splits[split].num_examples)
    except KeyError:  # No recorded split sizes (e.g. tfds.testing.mock_data).
        pass
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(0, lambda count, _: count + 1))
