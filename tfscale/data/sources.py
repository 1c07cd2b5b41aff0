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
import difflib
from typing import Any
from typing import Optional

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
      file_counts: the records in each file (`records.shard_counts`: from
        the shards' `counts.json`, else counted once and cached).
    """

    dataset: tf.data.Dataset
    num_examples: int
    image_shape: tuple[int, ...]
    num_classes: int
    files: tuple[str, ...] = ()
    file_counts: tuple[int, ...] = ()


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
      ValueError: for an unknown source kind, a pattern matching no file, an
        unknown TFDS dataset, or one not prepared in `tfds_data_dir` (without
        `download`).
      OSError: if `download` fails (e.g. without network).
    """
    if source == "synthetic":
        files = synthetic.ensure_shards(cache_dir, split)
        return _from_files(files, cache_dir)
    if source.startswith("tfrecord:"):
        pattern = source[len("tfrecord:") :].replace("{split}", split)
        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise ValueError(f"No file matches {pattern!r} (source={source!r}, split={split!r})")
        return _from_files(files, cache_dir)
    if source.startswith("tfds:") and len(source) > len("tfds:"):
        return _from_tfds(source[len("tfds:") :], split, tfds_data_dir, download)
    raise ValueError(f"Unknown data source {source!r}. Valid sources: {', '.join(SOURCE_KINDS)}")


def _from_files(files: list[str], cache_dir: Optional[str]) -> SplitData:
    counts = records.shard_counts(files, cache_dir=cache_dir or synthetic.default_cache_dir())
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
    return SplitData(dataset, sum(counts), _IMAGE_SHAPE, 10, tuple(files), tuple(counts))


def _from_tfds(name: str, split: str, data_dir: Optional[str], download: bool) -> SplitData:
    builder = _tfds_builder(name, data_dir)
    info = builder.info
    missing = {"image", "label"} - set(info.features.keys())
    if missing:
        raise ValueError(
            f"tfds:{name} needs 'image' and 'label' features; missing {sorted(missing)}"
        )
    if download:
        _tfds_download(name, builder)
    dataset = _tfds_read(name, builder, split).map(
        lambda image, label: (tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return SplitData(
        dataset,
        _tfds_num_examples(info, split, dataset),
        tuple(info.features["image"].shape),
        int(info.features["label"].num_classes),
    )


def _tfds_download(name: str, builder: Any) -> None:
    try:
        builder.download_and_prepare()
    except OSError as e:  # requests' connection errors too
        cause = (str(e).splitlines() or [type(e).__name__])[0]
        raise OSError(
            f"tfds:{name} could not be downloaded into {builder.data_dir_root} ({cause}); "
            "without network, prepare it on another machine and pass "
            "--config.data.tfds_data_dir=DIR"
        ) from e


def _tfds_read(name: str, builder: Any, split: str) -> tf.data.Dataset:
    """`(image, label)` pairs of a prepared split; a one-line error if not prepared."""
    try:
        return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:
        # TFDS signals data that was never prepared with an AssertionError.
        if builder.data_path.exists():
            raise
        raise ValueError(
            f"tfds:{name} is not prepared in the TFDS data dir {builder.data_dir_root} "
            f"(no {builder.data_dir}): pass --config.data.download=True to download it, "
            "or --config.data.tfds_data_dir=DIR naming a directory with a prepared copy"
        ) from None


def _tfds_builder(name: str, data_dir: Optional[str]) -> Any:
    """The TFDS builder of `name`; an unknown name is a one-line error."""
    import tensorflow_datasets as tfds  # Heavy import, only for TFDS sources.

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        # TFDS's own message lists every registered dataset, hundreds of lines.
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(f'tfds:{c}' for c in close)}?" if close else ""
        raise ValueError(f"Unknown TFDS dataset {name!r} (source 'tfds:{name}'){hint}") from None


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
