"""The TFRecord format of image-classification shards: write and parse.

Each record is a `tf.train.Example` with `image` (raw uint8 bytes, HxW),
`label` (int64) and `id` (int64, unique in the split, so a reader can audit
which elements it saw).

Record counts (`shard_counts`) come, for each file, from the first of:

1. a sidecar `counts.json` in the file's directory, written with the shards:
   a JSON object from file basename to record count, e.g.
   `{"part-00000.tfrecord": 1500, "part-00001.tfrecord": 1498}`. Files it
   does not list fall through to 2. `write_counts` writes one; write your own
   next to your shards so no start reads them through. It is trusted as is:
   rewrite it whenever the shards change;
2. a cache `<cache_dir>/record_counts.json`, keyed by absolute path, whose
   entries hold the file's size and mtime (ns) and count only while both
   match;
3. reading the file through (`count`), then stored in that cache.

Example:

```python
records.write_examples("/tmp/x.tfrecord", images, labels, ids)
ds = tf.data.TFRecordDataset(["/tmp/x.tfrecord"]).map(records.parse_fn((28, 28, 1)))
records.write_counts("/tmp", {"x.tfrecord": len(images)})
records.shard_counts(["/tmp/x.tfrecord"])  # [len(images)], from /tmp/counts.json
```
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Optional
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

__all__ = [
    "CACHE_FILE",
    "COUNTS_FILE",
    "count",
    "parse_fn",
    "shard_counts",
    "write_counts",
    "write_examples",
]

COUNTS_FILE = "counts.json"
CACHE_FILE = "record_counts.json"

Element = dict[str, tf.Tensor]

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "id": tf.io.FixedLenFeature([], tf.int64),
}


def write_examples(path: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """Writes uint8 images with their labels and ids to one TFRecord file.

    Raises:
      ValueError: if the three arrays differ in length or images are not uint8.
    """
    if not len(images) == len(labels) == len(ids):
        raise ValueError(
            "images, labels and ids must have the same length. Received: "
            f"{len(images)}, {len(labels)}, {len(ids)}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8. Received: dtype={images.dtype}")
    with tf.io.TFRecordWriter(path) as writer:
        for image, label, element_id in zip(images, labels, ids):
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": _bytes(image.tobytes()),
                        "label": _int(int(label)),
                        "id": _int(int(element_id)),
                    }
                )
            )
            writer.write(example.SerializeToString())


def count(path: str) -> int:
    """The number of records in one TFRecord file (reads it through)."""
    return int(tf.data.TFRecordDataset([path]).reduce(0, lambda n, _: n + 1))


def shard_counts(files: Sequence[str], cache_dir: Optional[str] = None) -> list[int]:
    """The number of records in each file, reading as few files as possible.

    Each count comes from the directory's `counts.json` sidecar, else from
    `<cache_dir>/record_counts.json` while the file's size and mtime match,
    else from reading the file through (stored in that cache, if
    `cache_dir` is given). A corrupt or unreadable cache counts as empty.

    Args:
      files: TFRecord file paths.
      cache_dir: a local directory where to keep the counts of files without
        a sidecar; None: no cache.

    Returns:
      The record counts, in the order of `files`.

    Raises:
      ValueError: for a malformed `counts.json` sidecar (naming it).
    """
    sidecars: dict[str, dict[str, int]] = {}
    cache: Optional[dict[str, Any]] = None
    fresh: dict[str, dict[str, int]] = {}
    counts = []
    for path in files:
        directory, name = os.path.split(path)
        if directory not in sidecars:
            sidecars[directory] = _read_sidecar(directory)
        if name in sidecars[directory]:
            counts.append(sidecars[directory][name])
            continue
        if cache_dir is None:
            counts.append(count(path))
            continue
        if cache is None:
            cache = _read_cache(cache_dir)
        key, stamp = _key(path), _stamp(path)
        entry = cache.get(key)
        if _valid_entry(entry) and {k: entry[k] for k in stamp} == stamp:
            counts.append(entry["count"])
            continue
        counts.append(count(path))
        fresh[key] = {"count": counts[-1], **stamp}
        cache[key] = fresh[key]
    if fresh:
        _update_cache(cache_dir, fresh)
    return counts


def write_counts(directory: str, counts: Mapping[str, int]) -> None:
    """Writes (replaces) the `counts.json` sidecar of the shards in `directory`.

    Args:
      directory: the directory holding the shards.
      counts: file basename -> its number of records.

    Raises:
      ValueError: for a name with a directory part or a count that is not a
        non-negative int.
    """
    for name, n in counts.items():
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            raise ValueError(f"counts must be keyed by file basenames. Received: {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"Record counts must be non-negative ints. Received: {name!r}: {n!r}")
    path = os.path.join(directory, COUNTS_FILE)
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        with tf.io.gfile.GFile(temp, "w") as f:
            f.write(json.dumps(dict(sorted(counts.items())), indent=1))
        tf.io.gfile.rename(temp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.remove(temp)
        raise


def parse_fn(image_shape: tuple[int, int, int]) -> Callable[[tf.Tensor], Element]:
    """Returns a function from a serialized record to `{"image", "label", "id"}`.

    The image comes out as float32 in [0, 1] with shape `image_shape`.
    """

    def parse(serialized: tf.Tensor) -> Element:
        features = tf.io.parse_single_example(serialized, _FEATURES)
        image = tf.io.decode_raw(features["image"], tf.uint8)
        image = tf.cast(tf.reshape(image, image_shape), tf.float32) / 255.0
        return {"image": image, "label": features["label"], "id": features["id"]}

    return parse


def _read_sidecar(directory: str) -> dict[str, int]:
    """The counts of `directory`'s sidecar; {} without one."""
    path = os.path.join(directory, COUNTS_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        counts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(counts, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()
    ):
        raise ValueError(
            f"{path} must map file basenames to non-negative record counts. "
            f"Received: {text[:200]!r}"
        )
    return counts


def _read_cache(cache_dir: str) -> dict[str, Any]:
    """The cache's entries; {} when absent, unreadable or corrupt (with a warning)."""
    path = os.path.join(cache_dir, CACHE_FILE)
    try:
        with open(path) as f:
            cache = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logging.warning("Ignoring the record count cache %s, which cannot be read: %s", path, e)
        return {}
    if not isinstance(cache, dict):
        logging.warning(
            "Ignoring the record count cache %s: expected a JSON object, got %s",
            path,
            type(cache).__name__,
        )
        return {}
    return cache


def _update_cache(cache_dir: str, fresh: dict[str, dict[str, int]]) -> None:
    """Adds entries to the cache atomically; a cache that cannot be written is skipped."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # Re-read just before writing, to keep entries other processes added since.
        cache = {**_read_cache(cache_dir), **fresh}
        fd, temp = tempfile.mkstemp(prefix=f".{CACHE_FILE}-", dir=cache_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
            os.replace(temp, os.path.join(cache_dir, CACHE_FILE))
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as e:
        logging.warning("Cannot write the record count cache in %s: %s", cache_dir, e)


def _valid_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), int) for k in ("count", "size", "mtime_ns")
    )


def _is_url(path: str) -> bool:
    return "://" in path


def _key(path: str) -> str:
    return path if _is_url(path) else os.path.abspath(path)


def _stamp(path: str) -> dict[str, int]:
    """The file's size and modification time (ns), which a valid cache entry matches."""
    if _is_url(path):
        stat = tf.io.gfile.stat(path)
        return {"size": int(stat.length), "mtime_ns": int(stat.mtime_nsec)}
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
