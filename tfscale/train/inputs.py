"""The training job's input: from the source directly, or through the dispatcher.

With `config.data.dispatcher.address` (an external `tfscale-dispatcher`) or
`config.data.dispatcher.embedded=True` (an in-process dispatcher journaling
to `workdir/dispatcher`), the train split's shard files are leased to this
worker instead of being read in full (several at once, in tf.data, with
`config.data.dispatcher.cycle_length`); the job is created from the
split; an existing job of that name is extended if only its epoch count is
lower, and used as it is if it differs otherwise (e.g. one that
`tfscale-dispatcher serve --shards=...` created).

Dispatched input keeps the dispatcher's order (each epoch's seeded shard
permutation, each shard shuffled through `config.data.shuffle_buffer` with a
seed per epoch and shard) instead of one shuffle buffer across shards,
so the elements training consumed are a prefix of what the dispatcher
delivered: `TrainInput.position(consumed)` is saved with each checkpoint
(with several workers, the union of theirs, see `input_group`), and a run
resuming from a checkpoint, on any number of workers, first rewinds the job
to it, so the shards consumed by steps lost in a crash are read again, and
the others are not.

Example:

```python
with contextlib.ExitStack() as stack:
    train = inputs.train_input(config, workdir, stack)
    model.fit(dist.distribute_dataset(train.dataset, 64, shard_policy=train.shard_policy),
              steps_per_epoch=train.steps_per_epoch, epochs=config.training.epochs)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any
from typing import Callable
from typing import Optional

import ml_collections
import tensorflow as tf
from absl import logging

from tfscale.data import dispatched
from tfscale.data import passes
from tfscale.data import readers
from tfscale.data import sources
from tfscale.data.dispatcher import auth
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import shards as shards_lib
from tfscale.data.dispatcher import types
from tfscale.train import config as config_lib
from tfscale.train import input_group

__all__ = [
    "TrainInput",
    "eval_input",
    "train_input",
]

_ShardPolicy = tf.data.experimental.AutoShardPolicy


@dataclasses.dataclass(frozen=True)
class TrainInput:
    """Attributes: dataset (unbatched, long enough for every epoch),
    steps_per_epoch, image_shape, num_classes, shard_policy (how
    `distribute_dataset` splits it among workers: DATA for the plain input,
    so every worker takes its part of each global batch of one seeded
    stream, the stream one device would see, and a resume at step `s`
    skips `s` global batches of it whatever the worker count; OFF when
    dispatched),
    dispatcher (the address used, or None), group (the dispatched input's
    `InputGroup`: the position and ledger checkpoints save, rewinds; None
    when not dispatched or equalized with "drop", which keeps no
    position), source (the `DispatchedInput`, for progress reports, or
    None), resume_from (start -> the plain input's stream from that
    element, or None; see `from_element`)."""

    dataset: tf.data.Dataset
    steps_per_epoch: int
    image_shape: tuple[int, ...]
    num_classes: int
    shard_policy: _ShardPolicy = _ShardPolicy.DATA
    dispatcher: Optional[str] = None
    group: Optional[input_group.InputGroup] = None
    source: Optional[dispatched.DispatchedInput] = None
    resume_from: Optional[Callable[[int], tf.data.Dataset]] = None

    @property
    def resumable_inside_epoch(self) -> bool:
        """Whether a checkpoint inside an epoch can resume this input exactly."""
        return self.dispatcher is None or self.group is not None

    def from_element(self, start: int) -> tf.data.Dataset:
        """`dataset` after its first `start` elements.

        The plain input starts at the pass holding element `start` and reads
        only the part of that pass before it; dispatched input was rewound to
        the checkpoint's position instead, so it is `dataset` itself.
        """
        if self.resume_from is None or not start:
            return self.dataset
        return self.resume_from(start)

    def checkpoint_state(self, consumed: int) -> dict[str, Any]:
        """What a checkpoint after `consumed` elements per worker saves of the input.

        The dispatched input's position and ledger (`InputGroup.checkpoint`;
        with several workers, every one calls this at the same step);
        `{"input_position": None}` for the plain input, which resumes by
        its step count.
        """
        if self.group is None:
            return {"input_position": None}
        return self.group.checkpoint(consumed)

    def continue_from(self, consumed: int) -> None:
        """The next iterator continues after the `consumed` elements per worker trained.

        Between two `fit`s (`InputGroup.continue_from`); the plain input
        continues through `from_element`.
        """
        if self.group is not None:
            self.group.continue_from(consumed)

    def audit(self) -> Optional[dict[str, Any]]:
        """The dispatched input's ledger audit (`InputGroup.audit`), or None without one."""
        return None if self.group is None else self.group.audit()

    def report_consumed(self, consumed: int) -> None:
        """Tells the dispatcher (if any) that training consumed `consumed` elements."""
        if self.source is not None:
            self.source.report_consumed(consumed)


def train_input(
    config: ml_collections.ConfigDict,
    workdir: str,
    stack: contextlib.ExitStack,
    resume: Optional[dict[str, Any]] = None,
    num_workers: int = 1,
    is_chief: bool = True,
) -> TrainInput:
    """The train split, shuffled; an embedded dispatcher is stopped by `stack`.

    Args:
      config: the training config.
      workdir: the run's workdir (an embedded dispatcher journals there).
      stack: owns the embedded dispatcher.
      resume: what the checkpoint being resumed saved of the input
        (`TrainInput.checkpoint_state`; None: from the start).
      num_workers: synchronous workers consuming the job; several get
        equal element counts per epoch (`config.data.dispatcher.equalize`).
        The job is rewound to the resumed position (the start if None) for
        all of them, by the chief, unless they equalize with "drop".
      is_chief: whether this worker rewinds the job for the group.
    """
    split = _load(config, config.data.train_split)
    options = config.data.dispatcher
    if options.address or options.embedded:
        return _dispatched(config, split, workdir, stack, resume or {}, num_workers, is_chief)
    dataset, count = _limit(split, config.data.max_train_examples)
    steps = _steps(config, count)

    def from_element(start: int) -> tf.data.Dataset:
        return passes.stream(dataset, count, config.data.shuffle_buffer or 0, config.seed, start)

    return TrainInput(
        from_element(0),
        steps,
        split.image_shape,
        split.num_classes,
        resume_from=from_element,
    )


def eval_input(config: ml_collections.ConfigDict) -> tuple[tf.data.Dataset, int]:
    """The eval split (repeated) and the number of whole global batches in it."""
    split = _load(config, config.data.eval_split)
    dataset, count = _limit(split, config.data.max_eval_examples)
    return dataset.repeat(), max(1, count // config.training.global_batch_size)


def _dispatched(
    config: ml_collections.ConfigDict,
    split: sources.SplitData,
    workdir: str,
    stack: contextlib.ExitStack,
    resume: dict[str, Any],
    num_workers: int,
    is_chief: bool,
) -> TrainInput:
    options = config.data.dispatcher
    shards, count = _shards(config, split)
    steps = _steps(config, count)  # before anything starts or is written
    if steps * config.training.global_batch_size > count:
        # The job's epochs are passes over the shards: training would run out.
        raise config_lib.ConfigError(
            f"config.training.steps_per_epoch={steps} needs "
            f"{steps * config.training.global_batch_size} examples an epoch, but the dispatched "
            f"train split has {count}: set it to at most "
            f"{count // config.training.global_batch_size} (or 0 for whole passes)"
        )
    address = options.address
    token = auth.read_token_file(options.auth_token_file)
    if options.embedded:
        server_config = server_lib.ServerConfig(
            work_dir=os.path.join(workdir, "dispatcher"), auth_token=token
        )
        address = stack.enter_context(server_lib.server_context(server_config)).target
    spec = types.JobSpec(
        name=options.job,
        shards=tuple(shards),
        policy=options.policy,
        num_epochs=config.training.epochs,
        seed=config.seed,
        lease_timeout_s=options.lease_timeout_s,
        num_consumers=num_workers if num_workers > 1 else 0,
        equalize=options.equalize if num_workers > 1 else "none",
    )
    same_shards = _ensure_job(address, token, spec, options.tls_root_cert_file)
    if split.files:
        reader = readers.records(split.image_shape)
    else:
        reader = readers.tfds_slices([s.name for s in shards], data_dir=config.data.tfds_data_dir)
    source = dispatched.DispatchedInput(
        address,
        options.job,
        reader,
        max_shards=options.max_shards,
        cycle_length=options.cycle_length,
        shuffle_buffer=config.data.shuffle_buffer or 0,
        seed=config.seed,
        track_consumed=True,  # lib.run's callback reports every step
        auth_token=token,
        tls_root_cert_file=options.tls_root_cert_file,
    )
    group = None
    if spec.equalize != "drop":
        # A job made elsewhere from other shards: no ledger (its sizes are unknown here).
        sizes = [s.size for s in spec.shards] if same_shards else None
        group = input_group.InputGroup(
            source, sizes, num_workers, is_chief, ledger_state=resume.get("input_ledger")
        )
        position = types.InputPosition()
        if resume.get("input_position") is not None:
            position = types.InputPosition.from_dict(resume["input_position"])
        group.start(position)
    read = _file_element if split.files else _tfds_element
    dataset = source.dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return TrainInput(
        dataset,
        steps,
        split.image_shape,
        split.num_classes,
        _ShardPolicy.OFF,
        address,
        group,
        source,
    )


def _ensure_job(
    address: str, token: Optional[str], spec: types.JobSpec, tls_root_cert_file: Optional[str]
) -> bool:
    """Creates (or extends) the job; an existing different one must have the epochs.

    Returns whether the job has `spec`'s shard count (its shards are then
    taken to be `spec`'s: a job this config made, e.g. for another worker
    count).
    """
    client = client_lib.DispatcherClient(
        address, auth_token=token, tls_root_cert_file=tls_root_cert_file
    )
    try:
        client.create_job(spec)  # no-op if it exists; more epochs extend it
        return True
    except types.AlreadyExists:
        (job,) = [j for j in client.list_jobs() if j.name == spec.name]
        if job.num_epochs < spec.num_epochs:
            raise config_lib.ConfigError(
                f"Dispatcher job {spec.name!r} at {address} has {job.num_epochs} epoch(s); "
                f"config.training.epochs={spec.num_epochs} needs as many "
                f"(tfscale-dispatcher serve --num_epochs={spec.num_epochs})"
            ) from None
        logging.info("Using the existing dispatcher job %r at %s", spec.name, address)
        return job.num_shards == len(spec.shards)
    finally:
        client.close()


def _shards(config: ml_collections.ConfigDict, split: sources.SplitData) -> tuple[list, int]:
    """The train shards and their element count (whole shards within the limit).

    Counts come with the split (`SplitData.file_counts`: the shards'
    `counts.json`, else counted once and cached): no start reads the data through.
    """
    if not split.files:
        name = config.data.source[len("tfds:") :]
        spec = f"tfds:{name}:{config.data.train_split}:{config.data.dispatcher.tfds_shards}"
        return shards_lib.expand(spec), split.num_examples
    counts = split.file_counts
    limit = config.data.max_train_examples or sum(counts)
    chosen, total = [], 0
    for path, n in zip(split.files, counts):
        if chosen and total + n > limit:
            break
        chosen.append(types.ShardSpec(path, n))
        total += n
    return chosen, total


def _file_element(element: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    return element["image"], element["label"]


def _tfds_element(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.cast(image, tf.float32) / 255.0, label


def _load(config: ml_collections.ConfigDict, split: str) -> sources.SplitData:
    try:
        return sources.load_split(
            config.data.source,
            split,
            cache_dir=config.data.cache_dir,
            tfds_data_dir=config.data.tfds_data_dir,
            download=config.data.download,
        )
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError(str(e)) from None


def _limit(split: sources.SplitData, limit: Any) -> tuple[tf.data.Dataset, int]:
    if limit is None or limit >= split.num_examples:
        return split.dataset, split.num_examples
    return split.dataset.take(limit), limit


def _steps(config: ml_collections.ConfigDict, count: int) -> int:
    global_batch = config.training.global_batch_size
    if count < global_batch:
        raise config_lib.ConfigError(
            f"The training split has {count} examples, fewer than one global batch "
            f"(config.training.global_batch_size={global_batch})"
        )
    return config.training.steps_per_epoch or count // global_batch
