"""The training config: every field with its default, and its validation.

Experiment files in `configs/` start from `base_config()` and change what
they need, so every field can be overridden from the command line
(`--config.training.epochs=5`). Fields whose default is "unset" are
ml_collections placeholders: `None`, but typed, so overrides parse.

Example:

```python
config = base_config()
config.distribution.kind = "one_device"
validate(config)
```
"""

from __future__ import annotations

import os
from typing import Any
from typing import Callable
from typing import Optional

import ml_collections
from ml_collections import config_dict

from tfscale.data.dispatcher import shards as dispatcher_shards
from tfscale.data.dispatcher import types as dispatcher_types

__all__ = [
    "ConfigError",
    "OPTIMIZERS",
    "PRECISIONS",
    "RESIZE",
    "base_config",
    "apply_variant",
    "set_options",
    "smoke",
    "validate",
]

OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
RESIZE = ("keep_global_batch", "keep_per_replica_batch")
MAX_STEPS_PER_EXECUTION = 10_000


class ConfigError(ValueError):
    """A config value, flag or workdir that cannot work, found before training starts.

    `tfscale-train` prints its message as one line and exits with status 2.
    """


def base_config() -> ml_collections.ConfigDict:
    """All fields of a training config, with defaults."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # tfscale.configure_devices arguments; unset leaves the devices alone.
    config.devices = ml_collections.ConfigDict(
        {
            "virtual_cpus": config_dict.placeholder(int),
            "virtual_gpus_per_gpu": config_dict.placeholder(int),
            "gpu_memory_limit_mb": config_dict.placeholder(int),
        }
    )
    # tfscale.distribution(kind, **options); only the options that are set
    # are passed, so an option the kind does not take is an error.
    config.distribution = ml_collections.ConfigDict(
        {
            "kind": "mirrored",
            "device": config_dict.placeholder(str),
            "devices": config_dict.placeholder(str),
            "all_reduce": config_dict.placeholder(str),
            "communication": config_dict.placeholder(str),
            "cluster": config_dict.placeholder(str),
            "task_index": config_dict.placeholder(int),
            # "dtensor" only: the mesh ("batch=2,model=2"), a layout preset
            # ("data_parallel", "megatron") and the axis batches split over.
            "mesh": config_dict.placeholder(str),
            "layout_map": config_dict.placeholder(str),
            "batch_axis": config_dict.placeholder(str),
            # "tpu" only: "auto", "local", a Cloud TPU name or "grpc://host:port",
            # and a named TPU's zone and project.
            "tpu": config_dict.placeholder(str),
            "zone": config_dict.placeholder(str),
            "project": config_dict.placeholder(str),
            # "auto" only: bytes a device may hold (default: the GPU's memory;
            # none on CPU). `devices` above limits the devices it plans for.
            "memory_budget": config_dict.placeholder(int),
        }
    )
    config.data = ml_collections.ConfigDict(
        {
            "source": "synthetic",
            "train_split": "train",
            "eval_split": "test",
            "cache_dir": config_dict.placeholder(str),
            "tfds_data_dir": config_dict.placeholder(str),
            "download": False,
            "shuffle_buffer": 8192,
            "max_train_examples": config_dict.placeholder(int),
            "max_eval_examples": config_dict.placeholder(int),
            # Lease the train shards from a dispatcher: an external one at
            # `address`, or an in-process one with `embedded=True`.
            "dispatcher": {
                "address": config_dict.placeholder(str),
                "embedded": False,
                "job": "train",
                "policy": "adaptive",
                "max_shards": 2,
                "lease_timeout_s": 30.0,
                "auth_token_file": config_dict.placeholder(str),
                # PEM root certificate of a TLS dispatcher.
                "tls_root_cert_file": config_dict.placeholder(str),
                # Shards read at once.
                "cycle_length": 4,
                "tfds_shards": 16,
                # Several synchronous workers get equal element counts per
                # epoch: "pad" (never short of a step) or "drop".
                "equalize": "pad",
            },
        }
    )
    config.model = ml_collections.ConfigDict({"name": "lenet", "kwargs": {}})
    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.05,
            "momentum": 0.9,
            # The rate above was tuned at this batch; it is scaled to the
            # global batch by `scaling` ("linear", "sqrt" or "none").
            "reference_batch_size": 128,
            "scaling": "linear",
            "warmup_epochs": 0.0,
        }
    )
    config.training = ml_collections.ConfigDict(
        {
            "global_batch_size": 128,
            "epochs": 3,
            "steps_per_epoch": config_dict.placeholder(int),
            # Training steps per compiled call (Keras's steps_per_execution):
            # fewer Python round trips for small models; callbacks, logs and
            # checkpoints then see every this many steps.
            "steps_per_execution": 1,
            "verbose": 1,
            "checkpoints_to_keep": 2,
            # Every this many steps: a log line (step, loss, examples/s) unless
            # the progress bar shows (verbose=1), and TensorBoard gets the
            # running loss and metrics (train/batch_*); 0: once per epoch only.
            "log_every_steps": 100,
            # Also checkpoint every this many steps (0: at epoch ends only),
            # so a crash loses at most this many steps; a SIGTERM always
            # checkpoints at the next step boundary and stops.
            "checkpoint_every_steps": 0,
            # On resuming with another replica count: "keep_global_batch" or
            # "keep_per_replica_batch" (global batch and learning rate rescale).
            "resize": "keep_global_batch",
            # Keras dtype policy of the model: "float32", or mixed precision
            # ("mixed_float16" with loss scaling, "mixed_bfloat16").
            "precision": "float32",
        }
    )
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a run of seconds, for tests."""
    config.data.max_train_examples = 1024
    config.data.max_eval_examples = 256
    config.data.shuffle_buffer = 1024
    config.training.global_batch_size = 64
    config.training.epochs = 2
    config.training.verbose = 2
    return config


def apply_variant(
    config: ml_collections.ConfigDict,
    variant: Optional[str],
    **variants: Callable[[ml_collections.ConfigDict], Any],
) -> ml_collections.ConfigDict:
    """Applies the variant named on the command line (`file.py:variant`).

    Example:

    ```python
    def get_config(variant=None):
        return apply_variant(base_config(), variant, smoke=smoke)
    ```

    Raises:
      ConfigError: for a variant not among `variants`.
    """
    if variant is None:
        return config
    if variant not in variants:
        raise ConfigError(
            f"Unknown config variant {variant!r}. Valid variants: {', '.join(sorted(variants))}"
        )
    variants[variant](config)
    return config


def set_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The options that are set (not None) in a section, as a dict."""
    return {k: v for k, v in config.to_dict().items() if v is not None}


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values that would otherwise fail late or obscurely.

    Raises:
      ConfigError: naming the field, what was expected and what came.
    """
    _check(config.seed, "seed", int, lambda v: v >= 0, "a non-negative int")
    training = config.training
    _check(
        training.global_batch_size,
        "training.global_batch_size",
        int,
        lambda v: v > 0,
        "a positive int",
    )
    _check(training.epochs, "training.epochs", int, lambda v: v > 0, "a positive int")
    if training.steps_per_epoch is not None:
        _check(
            training.steps_per_epoch,
            "training.steps_per_epoch",
            int,
            lambda v: v > 0,
            "a positive int",
        )
    _check(
        training.steps_per_execution,
        "training.steps_per_execution",
        int,
        lambda v: 1 <= v <= MAX_STEPS_PER_EXECUTION,
        f"an int in [1, {MAX_STEPS_PER_EXECUTION}]",
    )
    _check(training.verbose, "training.verbose", int, lambda v: v in (0, 1, 2), "0, 1 or 2")
    _check(
        training.checkpoints_to_keep,
        "training.checkpoints_to_keep",
        int,
        lambda v: v > 0,
        "a positive int",
    )
    _check(
        training.log_every_steps,
        "training.log_every_steps",
        int,
        lambda v: v >= 0,
        "a non-negative int",
    )
    _check(
        training.checkpoint_every_steps,
        "training.checkpoint_every_steps",
        int,
        lambda v: v >= 0,
        "a non-negative int",
    )
    _check(training.resize, "training.resize", str, lambda v: v in RESIZE, f"one of {RESIZE}")
    _check(
        training.precision,
        "training.precision",
        str,
        lambda v: v in PRECISIONS,
        f"one of {PRECISIONS}",
    )
    optimizer = config.optimizer
    _check(optimizer.name, "optimizer.name", str, lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}")
    _check(
        optimizer.learning_rate,
        "optimizer.learning_rate",
        float,
        lambda v: v > 0,
        "a positive number",
    )
    _check(
        optimizer.warmup_epochs,
        "optimizer.warmup_epochs",
        float,
        lambda v: v >= 0,
        "a non-negative number",
    )
    for name in ("max_train_examples", "max_eval_examples"):
        value = config.data[name]
        if value is not None:
            _check(value, f"data.{name}", int, lambda v: v > 0, "a positive int")
    _check(
        config.data.shuffle_buffer,
        "data.shuffle_buffer",
        int,
        lambda v: v >= 0,
        "a non-negative int",
    )
    _validate_dispatcher(config.data.dispatcher)


def _validate_dispatcher(options: ml_collections.ConfigDict) -> None:
    if options.address and options.embedded:
        raise ConfigError(
            "config.data.dispatcher: set address or embedded=True, not both. Received: "
            f"address={options.address!r}, embedded=True"
        )
    if options.address is not None:
        host, _, port = options.address.rpartition(":")
        _check(
            options.address,
            "data.dispatcher.address",
            str,
            lambda v: bool(host) and port.isdigit(),
            "HOST:PORT",
        )
    policies = dispatcher_types.POLICY_NAMES
    max_shards = dispatcher_types.MAX_SHARDS_PER_CALL
    max_tfds_shards = dispatcher_shards.MAX_TFDS_SLICES
    _check(
        options.policy, "data.dispatcher.policy", str, lambda v: v in policies, f"one of {policies}"
    )
    _check(
        options.max_shards,
        "data.dispatcher.max_shards",
        int,
        lambda v: 1 <= v <= max_shards,
        f"in [1, {max_shards}]",
    )
    _check(
        options.lease_timeout_s,
        "data.dispatcher.lease_timeout_s",
        float,
        lambda v: v > 0,
        "a positive number",
    )
    _check(
        options.cycle_length,
        "data.dispatcher.cycle_length",
        int,
        lambda v: 1 <= v <= 64,
        "in [1, 64]",
    )
    _check(
        options.tfds_shards,
        "data.dispatcher.tfds_shards",
        int,
        lambda v: 1 <= v <= max_tfds_shards,
        f"in [1, {max_tfds_shards}]",
    )
    _check(
        options.equalize,
        "data.dispatcher.equalize",
        str,
        lambda v: v in ("drop", "pad"),
        "drop or pad",
    )
    for name in ("auth_token_file", "tls_root_cert_file"):
        path = options[name]
        if path is not None and not os.path.isfile(path):
            raise ConfigError(
                f"config.data.dispatcher.{name} must name an existing file. "
                f"Received: {name}={path!r}"
            )


def _check(value: Any, name: str, kind: type, ok: Any, expected: str) -> None:
    numeric = kind is float and isinstance(value, (int, float))
    if isinstance(value, bool) or not (isinstance(value, kind) or numeric) or not ok(value):
        raise ConfigError(f"config.{name} must be {expected}. Received: {name}={value!r}")
