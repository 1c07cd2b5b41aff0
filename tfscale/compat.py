"""Every touch of a private TensorFlow or Keras name, in one place.

tfscale fixes paths that upstream breaks, and a few of the fixes reach
below the public API. Each such touch lives here, with what upstream
behaviour it relies on; `tests/compat_test.py` checks each one against the
installed TensorFlow and Keras, so an upgrade that changes one fails there
with a message naming it, not somewhere deep in a training run.

A missing name raises `UpstreamChangedError` naming the touch and the
installed versions.

Example:

```python
from tfscale import compat

compat.disable_device_pipeline_autotune()
path = compat.keras_name_scope_path()  # e.g. "dense_1" inside a layer's build
```
"""

from __future__ import annotations

import importlib
import sys
from typing import Any
from typing import Callable
from typing import Optional

import keras
import tensorflow as tf

__all__ = [
    "DistributedDatasetBase",
    "ReadOverride",
    "UpstreamChangedError",
    "default_extended_class",
    "disable_device_pipeline_autotune",
    "dtensor_initialized",
    "get_job_key",
    "insert_job_key",
    "keras_generator_peek",
    "in_keras_model_build",
    "keras_name_scope_path",
    "ordered_parallel_interleave",
    "set_collective_key_base",
    "set_initial_epoch",
    "strategy_extended_scope",
    "trace_time_collective_keys",
    "wait_at_barrier",
]


class UpstreamChangedError(RuntimeError):
    """An upstream internal tfscale relies on is missing or changed."""


def _upstream(module: str, name: str, use: str) -> Any:
    """`module.name`, or an error saying which tfscale fix needs it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UpstreamChangedError(
            f"tfscale needs {module}.{name} ({use}), which TensorFlow {tf.__version__} / "
            f"Keras {keras.__version__} does not have: {e}"
        ) from None


# --- Keras -----------------------------------------------------------------


def keras_name_scope_path() -> str:
    """The Keras name scope path at this point of a model's build, e.g. `"block1/dense"`.

    Upstream: `keras.src.backend.common.name_scope.current_path()`; Keras
    opens a name scope per layer while it creates the layer's variables,
    and a variable's layout rule matches on that path (as Keras's own
    `LayoutMap` does for JAX).
    """
    return _upstream("keras.src.backend.common.name_scope", "current_path", "variable paths")()


def set_initial_epoch(model: keras.Model, epoch: int) -> None:
    """Makes the next `model.fit` start at `epoch` (0-based), as on a restore.

    Upstream: `Model.fit` reads `model._initial_epoch` (set by
    `keras.callbacks.BackupAndRestore` on train begin) and, when it is not
    None, starts its epoch loop there instead of at `initial_epoch`.
    """
    if not hasattr(model, "_initial_epoch"):
        raise UpstreamChangedError(
            f"tfscale resumes training through keras.Model._initial_epoch (read by fit), which "
            f"Keras {keras.__version__} does not have"
        )
    model._initial_epoch = epoch  # pylint: disable=protected-access


def keras_generator_peek() -> Optional[Any]:
    """The first batch of a Python generator `fit`/`evaluate` is peeking at, else None.

    Under a strategy, Keras's `TensorFlowTrainer._maybe_symbolic_build`
    iterates the input once more, to build the model from one batch, before
    the epoch starts. A generator cannot be rewound: that extra iterator's
    prefetch buffers drain batches from it, which training then never sees
    (epoch 1 trained on batches 0, 1, 5, 6, 7 of 0-7). tfscale's distributed
    datasets call this when iterated and, inside that build, hand it this
    batch instead of reading the generator (`GeneratorDataAdapter` keeps its
    first two batches to infer the input signature, then trains on them).

    Upstream: the frame of `_maybe_symbolic_build` holds the epoch iterator
    as `iterator`; its `data_adapter` of a generator has `_first_batches`.
    """
    frame = sys._getframe(1)  # pylint: disable=protected-access
    for _ in range(_PEEK_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_name == "_maybe_symbolic_build":
            adapter = getattr(frame.f_locals.get("iterator"), "data_adapter", None)
            batches = getattr(adapter, "_first_batches", None)
            return batches[0] if batches else None
        frame = frame.f_back
    return None


_PEEK_FRAMES = 12


def in_keras_model_build() -> bool:
    """Whether the caller runs inside Keras's model build from one batch.

    Under a strategy, `fit` and `evaluate` iterate their input once more
    before the epoch, only to build the model from one batch's shapes.

    Upstream: `TensorFlowTrainer._maybe_symbolic_build`, found on the stack.
    """
    frame = sys._getframe(1)  # pylint: disable=protected-access
    for _ in range(_PEEK_FRAMES):
        if frame is None:
            return False
        if frame.f_code.co_name == "_maybe_symbolic_build":
            return True
        frame = frame.f_back
    return False


# --- tf.distribute ---------------------------------------------------------


def trace_time_collective_keys(strategy: tf.distribute.Strategy) -> int:
    """Makes a strategy's collective all-reduces take instance keys when traced.

    With two or more replicas, Keras's `steps_per_execution > 1` runs
    `strategy.run` inside a `tf.cond` inside a `tf.while_loop`; a collective
    all-reduce there takes its instance key as a call-time capture, which
    `cond_v2` does not forward, and the step fails with "You must feed a
    value for placeholder tensor ... while/cond/Placeholder"
    (keras-team/keras#19246). Keys fixed when the step is traced (what
    TensorFlow does outside functions) need no capture. Every call of one
    traced step then reuses its keys, which is safe for steps that run one
    after another, as Keras runs them.

    Upstream: the `CollectiveAllReduce` cross-device ops keep one
    `CollectiveReplicaLauncher` per replica in `_launchers`, and a launcher
    asks `_use_unique_instance_key()` which kind of key to make.

    Returns:
      The number of launchers changed (0 for cross-device ops without
      collectives, e.g. `reduce_to_one`).
    """
    extended = strategy.extended
    ops = {}
    for name in ("_collective_ops", "_cross_device_ops"):
        value = getattr(extended, name, None)
        if value is not None:
            ops[id(value)] = value
    changed = 0
    for cross_device_ops in ops.values():
        for launcher in getattr(cross_device_ops, "_launchers", ()):
            if not hasattr(launcher, "_use_unique_instance_key"):
                raise UpstreamChangedError(
                    "tfscale needs CollectiveReplicaLauncher._use_unique_instance_key "
                    f"(steps_per_execution under a strategy), which TensorFlow {tf.__version__} "
                    "does not have"
                )
            launcher._use_unique_instance_key = _never  # pylint: disable=protected-access
            changed += 1
    return changed


def _never() -> bool:
    return False


def default_extended_class() -> type:
    """The default strategy's `StrategyExtended`, the base of the dtensor strategy's.

    Upstream: `distribute_lib._DefaultDistributionExtended` runs a replica
    function once, in the caller's context (one "replica" that is the whole
    mesh), and lets subclasses override its hooks: `_create_variable`,
    `_call_for_each_replica`, `_experimental_distribute_dataset` and
    `_distribute_datasets_from_function` (the names `tf.distribute.Strategy`
    calls; `tests/compat_test.py` checks the first two, the dtensor tests
    the others).
    """
    return _upstream(
        "tensorflow.python.distribute.distribute_lib",
        "_DefaultDistributionExtended",
        "the dtensor strategy's base",
    )


def strategy_extended_scope(extended: Any, strategy: tf.distribute.Strategy) -> Any:
    """The scope that installs `extended._create_variable` as variable creator.

    Upstream: `StrategyExtendedV2._scope`; the default strategy's override
    only checks for nesting, so the dtensor strategy calls the generic one.
    """
    extended_v2 = _upstream(
        "tensorflow.python.distribute.distribute_lib", "StrategyExtendedV2", "strategy scopes"
    )
    scope = getattr(extended_v2, "_scope", None)
    if scope is None:
        raise UpstreamChangedError(
            f"tfscale needs StrategyExtendedV2._scope (the variable-creator scope), which "
            f"TensorFlow {tf.__version__} does not have"
        )
    return scope(extended, strategy)


def _distributed_dataset_class() -> type:
    return _upstream(
        "tensorflow.python.distribute.input_lib",
        "DistributedDataset",
        "a dataset Keras's fit accepts under a strategy",
    )


DistributedDatasetBase: type = _distributed_dataset_class()
"""Base of tfscale's distributed inputs.

Upstream: Keras's data adapter accepts a strategy's input only when its
class (or a base) is named `DistributedDataset` (a class-name check, not
`isinstance` with a public type); subclasses do not call its `__init__`.
"""


def set_collective_key_base(strategy: tf.distribute.MirroredStrategy, base: int) -> None:
    """Sets the collective key base a `MirroredStrategy` reads while it is built.

    Call it in a subclass's `__init__` before `super().__init__`.
    Upstream: `MirroredExtended.__init__` starts its collective group keys
    at `1 + strategy._collective_key_base` (0 when unset).
    """
    strategy._collective_key_base = base  # pylint: disable=protected-access


def disable_device_pipeline_autotune() -> None:
    """Turns tf.data autotuning off in a distributed iterator's per-device pipelines.

    Deleting a tf.data iterator whose autotuning ("model") thread is asleep
    can block for the rest of that thread's optimization period, which
    doubles up to 60 s: the destructor cancels the thread and joins it, but
    `Model::OptimizeLoop` is woken before `CancellationManager::IsCancelled()`
    turns true (callbacks run first), so it may sleep again. Keras deletes
    the training iterator when `fit` returns. The `MultiDeviceIterator` that
    feeds each device builds one pipeline per device (a fixed one-element
    prefetch: nothing to tune) with default options, where no public API
    reaches, so its builder is wrapped here, once.

    Upstream: `multi_device_iterator_ops._create_device_dataset` builds each
    per-device pipeline and is looked up by name at each use.
    """
    module = importlib.import_module("tensorflow.python.data.ops.multi_device_iterator_ops")
    create = _upstream(module.__name__, "_create_device_dataset", "per-device input pipelines")
    if getattr(create, "tfscale_no_autotune", False):
        return

    def create_without_autotune(*args: Any, **kwargs: Any) -> tf.data.Dataset:
        options = tf.data.Options()
        options.autotune.enabled = False
        return create(*args, **kwargs).with_options(options)

    create_without_autotune.tfscale_no_autotune = True  # type: ignore[attr-defined]
    module._create_device_dataset = create_without_autotune  # pylint: disable=protected-access


# --- variables -------------------------------------------------------------


class ReadOverride:
    """Mixin for a resource variable whose reads may come from elsewhere.

    A subclass implements `read_override()`: a tensor to read instead of
    the variable's value, or None for the usual read.

    Upstream: `BaseResourceVariable._read_variable_op` is the one method
    every read (`value()`, `read_value()`, the tensor conversion) goes
    through.
    """

    def read_override(self) -> Optional[tf.Tensor]:
        raise NotImplementedError

    def _read_variable_op(self, no_copy: bool = False) -> tf.Tensor:
        value = self.read_override()
        if value is None:
            return super()._read_variable_op(no_copy=no_copy)  # type: ignore[misc]
        return tf.identity(value)


# --- DTensor and the coordination service ----------------------------------


def dtensor_initialized() -> bool:
    """Whether DTensor's accelerator system is initialized in this process.

    Upstream: `tensorflow.dtensor.python.accelerator_util.is_initialized`
    (no public equivalent; `dtensor.initialize_accelerator_system` raises on
    a second call).
    """
    return _upstream(
        "tensorflow.dtensor.python.accelerator_util", "is_initialized", "DTensor set-up"
    )()


def wait_at_barrier(name: str, timeout_ms: int) -> None:
    """Blocks until every task of the coordination service reached `name`.

    Upstream: `context.context().wait_at_barrier` (the coordination
    service's barrier; there is no public API for it).

    Raises:
      tf.errors.DeadlineExceededError: if a task did not arrive in time.
    """
    context = _upstream("tensorflow.python.eager.context", "context", "exit barriers")()
    context.wait_at_barrier(name, timeout_ms)


def insert_job_key(key: str, value: str) -> bool:
    """Stores `key` in the job's coordination service; False if it is there already.

    Upstream: `context.context().set_config_key_value` (the coordination
    service's key-value store, first writer wins; there is no public API).
    """
    context = _upstream("tensorflow.python.eager.context", "context", "job keys")()
    try:
        context.set_config_key_value(key, value)
    except tf.errors.AlreadyExistsError:
        return False
    return True


def get_job_key(key: str, timeout_ms: int = 0) -> str:
    """The value of `key` in the job's coordination service, once some task stored it.

    Upstream: `context.context().get_config_key_value`; `timeout_ms=0`
    waits until the key is stored (the call releases the GIL).

    Raises:
      tf.errors.DeadlineExceededError: if nobody stored it within `timeout_ms`.
    """
    context = _upstream("tensorflow.python.eager.context", "context", "job keys")()
    return context.get_config_key_value(key, timeout_ms)


# --- tf.data ---------------------------------------------------------------


def ordered_parallel_interleave(
    dataset: tf.data.Dataset,
    map_func: Callable[[Any], tf.data.Dataset],
    *,
    cycle_length: int,
    block_length: int,
    buffer_output_elements: int,
) -> tf.data.Dataset:
    """A deterministic parallel interleave with a bounded buffer per input.

    The public `interleave(num_parallel_calls=...)` sizes each input's
    buffer by `block_length`; a whole shard as one block would buffer the
    whole shard. Upstream: `interleave_op._ParallelInterleaveDataset` takes
    `buffer_output_elements` apart from `block_length`.
    """
    parallel_interleave = _upstream(
        "tensorflow.python.data.ops.interleave_op",
        "_ParallelInterleaveDataset",
        "bounded parallel shard reads",
    )
    return parallel_interleave(
        dataset,
        map_func,
        cycle_length=cycle_length,
        block_length=block_length,
        num_parallel_calls=cycle_length,
        buffer_output_elements=buffer_output_elements,
        prefetch_input_elements=1,
        deterministic=True,
    )
