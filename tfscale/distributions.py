"""The registry of distribution kinds: `tfscale.distribution(kind, **options)`.

A kind name maps to a factory that returns a `Distribution` (see
`tfscale.distribution_base`); callers only see `scope()`,
`distribute_dataset(...)`, `num_replicas_in_sync`, `is_chief` and
`strategy`, so switching from one device to many is a change of the kind
string. A new kind registers its factory here and touches nothing else.

Example:

```python
import tfscale

tfscale.configure_devices(virtual_cpus=2)
dist = tfscale.distribution("mirrored")
with dist.scope():
    model = keras.Sequential([keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss="mse")
model.fit(dist.distribute_dataset(unbatched_ds, global_batch_size=64), epochs=2)
```
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any
from typing import Callable

from tfscale.distribution_base import Distribution
from tfscale.planner import auto as planner_auto
from tfscale.sharding import distribution as sharding_distribution
from tfscale.strategies import distribution as strategy_distribution
from tfscale.strategies import local
from tfscale.strategies import multi_worker
from tfscale.strategies import tpu

__all__ = [
    "Kind",
    "distribution",
    "kind_options",
    "kinds",
    "register",
    "spans_hosts",
]


@dataclasses.dataclass(frozen=True)
class Kind:
    """A registered distribution kind.

    Attributes:
      name: what `tfscale.distribution(name)` takes.
      factory: builds the `Distribution` from the kind's options; its
        signature lists them.
      spans_hosts: whether one distribution can span several worker
        processes (a one-host kind inside a multi-worker cluster would train
        N independent copies).
    """

    name: str
    factory: Callable[..., Distribution]
    spans_hosts: bool

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.factory).parameters)


_KINDS: dict[str, Kind] = {}


def register(name: str, factory: Callable[..., Distribution], *, spans_hosts: bool) -> None:
    """Registers a kind under `name`.

    Raises:
      ValueError: if a kind of that name exists.
    """
    if name in _KINDS:
        raise ValueError(f"Distribution kind {name!r} is registered already")
    _KINDS[name] = Kind(name, factory, spans_hosts)


register("default", strategy_distribution.kind("default", local.default), spans_hosts=False)
register(
    "one_device", strategy_distribution.kind("one_device", local.one_device), spans_hosts=False
)
register("mirrored", strategy_distribution.kind("mirrored", local.mirrored), spans_hosts=False)
register(
    "multi_worker_mirrored",
    strategy_distribution.kind("multi_worker_mirrored", multi_worker.multi_worker_mirrored),
    spans_hosts=True,
)
register("dtensor", sharding_distribution.dtensor_distribution, spans_hosts=True)
# One client process drives every host of a TPU pod slice.
register("tpu", tpu.tpu_distribution, spans_hosts=True)


def kinds() -> tuple[str, ...]:
    """The valid kind names."""
    return tuple(sorted(_KINDS))


def _kind(name: str) -> Kind:
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(f"Unknown distribution kind {name!r}. Valid kinds: {', '.join(kinds())}")
    return kind


def kind_options(kind: str) -> tuple[str, ...]:
    """The option names `distribution(kind, ...)` takes.

    Raises:
      ValueError: for an unknown kind, listing the valid ones.
    """
    return _kind(kind).options


def spans_hosts(kind: str) -> bool:
    """Whether a distribution of `kind` can span several worker processes.

    Raises:
      ValueError: for an unknown kind, listing the valid ones.
    """
    return _kind(kind).spans_hosts


def distribution(kind: str = "default", **options: Any) -> Distribution:
    """Builds the distribution of the given kind.

    Args:
      kind: one of `kinds()`: `"default"`, `"one_device"` (option `device`),
        `"mirrored"` (options `devices`, `all_reduce`),
        `"multi_worker_mirrored"` (options `communication`, `cluster`,
        `task_index`), `"dtensor"` (options `mesh`, `layout_map`,
        `batch_axis`, `cluster`, `task_index`; see
        `tfscale.sharding.distribution.dtensor_distribution`), `"tpu"`
        (options `tpu`, `zone`, `project`; see
        `tfscale.strategies.tpu.tpu_distribution`), `"auto"` (options
        `model_fn`, `global_batch_size`, `memory_budget`, `optimizer`, ...:
        the planner chooses one of the others; see `tfscale.planner.plan`).
      **options: options of that kind.

    Returns:
      A `Distribution`.

    Raises:
      ValueError: for an unknown kind or option, listing the valid ones, or
        a bad option value.

    Example:

    ```python
    dist = tfscale.distribution("mirrored", devices=2, all_reduce="reduce_to_one")
    dist = tfscale.distribution("dtensor", mesh="batch=2,model=2", layout_map="megatron")
    dist = tfscale.distribution("auto", model_fn=make_model, global_batch_size=64)
    ```
    """
    factory = _kind(kind).factory
    parameters = inspect.signature(factory).parameters
    valid = tuple(parameters)
    missing = [n for n, p in parameters.items() if p.default is p.empty and n not in options]
    if missing:
        raise ValueError(
            f"Distribution kind {kind!r} needs option(s) {', '.join(missing)}. "
            f"Received: {', '.join(sorted(options)) or '(none)'}"
        )
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for distribution kind {kind!r}. "
            f"Valid options: {', '.join(valid) or '(none)'}"
        )
    return factory(**options)


# Last: the planner builds the kind it chooses with `distribution` above.
register("auto", planner_auto.factory(distribution), spans_hosts=False)
