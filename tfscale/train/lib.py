"""`run(config, workdir)`: one training job from a config, resumable.

Data flow: config -> devices -> `tfscale.distribution` -> input split ->
`dist.distribute_dataset` -> model built and compiled in `dist.scope()` ->
`model.fit` with callbacks -> evaluation -> `workdir/metrics.json`.

The workdir holds `checkpoints/` (resume state), `tensorboard/` and
`metrics.json`; only the chief writes there. Running again on the same
workdir continues from the last finished epoch.

Example:

```python
from tfscale.train import config as config_lib, lib

config = config_lib.smoke(config_lib.base_config())
metrics = lib.run(config, "/tmp/tfscale/smoke")
metrics["eval"]["accuracy"]
```
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Optional

import keras
import ml_collections
from absl import logging

from tfscale import devices
from tfscale import distribution_base
from tfscale import distributions as distribution_lib
from tfscale import planner
from tfscale.data import sources
from tfscale.strategies import cluster as cluster_lib
from tfscale.train import callbacks as callbacks_lib
from tfscale.train import config as config_lib
from tfscale.train import files
from tfscale.train import inputs
from tfscale.train import models
from tfscale.train import schedules

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "run",
]

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains, evaluates and writes `workdir/metrics.json` (on the chief).

    Args:
      config: a config built on `tfscale.train.config.base_config()`.
      workdir: output directory; an existing one is resumed.

    Returns:
      The metrics written to `metrics.json`.

    Raises:
      config_lib.ConfigError: for a bad config value, a workdir that cannot
        be written or a checkpoint that cannot be read, before the model is
        built and before anything is written.
    """
    start = time.perf_counter()
    config_lib.validate(config)
    _check_step_checkpoints(config)
    _check_workdir(workdir)
    _configure_devices(config)
    _check_precision(config.training.precision)
    dist = _distribution(config)
    resume = _resume_state(os.path.join(workdir, CHECKPOINTS_DIR))
    config = _resized(config, dist, resume)
    try:
        dist.per_worker_batch_size(config.training.global_batch_size)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.training: {e}") from None
    # Before the input pipeline: its shuffle seeds combine with the global seed.
    keras.utils.set_random_seed(config.seed)
    with contextlib.ExitStack() as stack:
        train = inputs.train_input(
            config,
            workdir,
            stack,
            resume=resume.get("extra"),
            num_workers=dist.num_workers,
            is_chief=dist.is_chief,
        )
        metrics = _fit(config, workdir, dist, train, resume)
    metrics["wall_time_s"] = time.perf_counter() - start
    if dist.is_chief:
        files.write_json_atomic(os.path.join(workdir, METRICS_FILE), metrics)
    logging.info("eval: %s", metrics["eval"])
    return metrics


def _fit(
    config: ml_collections.ConfigDict,
    workdir: str,
    dist: distribution_base.Distribution,
    train: inputs.TrainInput,
    resume: dict[str, Any],
) -> dict[str, Any]:
    """Builds, trains and evaluates the model; returns the metrics.

    `resume` is the checkpoint state being resumed (`{}` for a fresh run).
    """
    global_batch = config.training.global_batch_size
    steps_per_epoch = train.steps_per_epoch
    evaluation, eval_steps = inputs.eval_input(config)
    logging.info("%s; %d steps per epoch of %d examples", dist, steps_per_epoch, global_batch)

    with _precision(config.training.precision), dist.scope():
        model = models.build(
            config.model.name, train.image_shape, train.num_classes, **config.model.kwargs
        )
        model.compile(
            optimizer=_optimizer(config, steps_per_epoch),
            loss=models.loss(config.model.name),
            metrics=["accuracy"],
            steps_per_execution=config.training.steps_per_execution,
        )
    report = dist.memory_report(model)
    if report is not None:
        logging.info("Memory per device:\n%s", report)
    if dist.is_chief:
        os.makedirs(workdir, exist_ok=True)
        # The config the checkpoints were trained with, e.g. for serving them.
        files.write_json_atomic(
            os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort())
        )
    throughput = callbacks_lib.Throughput(
        global_batch,
        os.path.join(workdir, "tensorboard") if dist.is_chief else None,
        # Not under Keras's progress bar (verbose=1), which a line would cut.
        log_every_steps=config.training.log_every_steps if config.training.verbose != 1 else 0,
    )
    consumed = _ConsumedElements(dist.per_worker_batch_size(global_batch), train.report_consumed)
    epochs = list(resume.get("extra", {}).get("history", []))

    def checkpoint_extra(epoch: int, logs: Optional[dict[str, Any]]) -> dict[str, Any]:
        if logs is not None:  # an epoch's end (None: a checkpoint inside an epoch)
            del epochs[epoch - 1 :]  # a resumed epoch replaces what a crash left
            epochs.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        return {
            **train.checkpoint_state(consumed.count),
            "history": list(epochs),
            "per_replica_batch": dist.per_replica_batch_size(global_batch),
            "replicas": dist.num_replicas_in_sync,
        }

    backup = callbacks_lib.BackupAndRestore(
        os.path.join(workdir, CHECKPOINTS_DIR),
        is_chief=dist.is_chief,
        max_to_keep=config.training.checkpoints_to_keep,
        extra_state=checkpoint_extra,
        every_steps=config.training.checkpoint_every_steps,
        # Not with an input that cannot resume inside an epoch (see
        # _check_step_checkpoints): SIGTERM then ends the process at once.
        stop_on_sigterm=train.resumable_inside_epoch,
        num_workers=dist.num_workers,
    )
    tensorboard = callbacks_lib.TensorBoard(
        os.path.join(workdir, "tensorboard"),
        is_chief=dist.is_chief,
        update_freq=config.training.log_every_steps or "epoch",
    )
    # Throughput first: its figures join the logs the checkpoint saves.
    fit_callbacks = [throughput, backup, consumed, tensorboard]

    def fit(skip: int, epochs: int, steps: int) -> keras.callbacks.History:
        """`fit` on the input after its first `skip` elements (a plain input is
        deterministic: it continues its stream exactly; a dispatched one was
        rewound to its checkpoint position, or to where the previous fit
        stopped)."""
        dataset = train.from_element(skip)
        return model.fit(
            dist.distribute_dataset(dataset, global_batch, shard_policy=train.shard_policy),
            epochs=epochs,
            steps_per_epoch=steps,
            callbacks=fit_callbacks,
            shuffle=False,  # The input pipeline shuffles.
            verbose=config.training.verbose,
        )

    # The elements the checkpoint's steps consumed, at its own global batch.
    saved = resume.get("extra", {})
    saved_batch = saved.get("per_replica_batch", 0) * saved.get("replicas", 0) or global_batch
    skip = resume.get("step", 0) * saved_batch
    inside = resume.get("step_in_epoch", 0)
    epochs_run = 0
    if inside:  # resumed inside an epoch: first the rest of it
        remaining = steps_per_epoch - inside
        if remaining <= 0:
            raise config_lib.ConfigError(
                f"The checkpoint stopped {inside} steps into epoch {resume['epoch'] + 1}, but an "
                f"epoch now has {steps_per_epoch} steps (training.resize="
                f"{config.training.resize} changed the global batch): resume on the former "
                "replica count, or with training.resize=keep_global_batch"
            )
        backup.first_epoch_offset = inside
        epochs_run += len(fit(skip, resume["epoch"] + 1, remaining).epoch)
        skip += remaining * global_batch
        if not backup.preempted:
            # The next fit's iterators continue where this one's training stopped.
            train.continue_from(consumed.count)
    if not backup.preempted and (not inside or resume["epoch"] + 1 < config.training.epochs):
        # A run whose epochs are all done trains nothing (the callback only
        # restores the weights): no need to skip through the input first.
        done = resume.get("epoch", 0) + (1 if inside else 0) >= config.training.epochs
        epochs_run += len(fit(0 if done else skip, config.training.epochs, steps_per_epoch).epoch)
    if backup.preempted:
        raise Preempted(
            f"preempted (SIGTERM): a checkpoint is saved in {os.path.join(workdir, CHECKPOINTS_DIR)}; "
            "run the same command to resume from it"
        )
    eval_logs = model.evaluate(
        dist.distribute_dataset(evaluation, global_batch),
        steps=eval_steps,
        return_dict=True,
        verbose=config.training.verbose,
    )
    if dist.is_chief:
        callbacks_lib.log_evaluation(
            os.path.join(workdir, "tensorboard"), eval_logs, int(model.optimizer.iterations.numpy())
        )
    metrics = _metrics(config, dist, resume.get("epoch", 0), epochs_run, epochs, eval_logs)
    metrics["eval"]["examples"] = eval_steps * global_batch
    metrics["dispatcher"] = train.dispatcher
    audit = train.audit()
    if audit is not None:
        metrics["input_audit"] = audit
        logging.info(
            "Input audit: %d elements trained over %d epoch(s) of the job; %d duplicated, "
            "%d missing",
            audit["elements"],
            len(audit["epochs"]),
            audit["duplicated_elements"],
            audit["missing_elements"],
        )
    report = dist.memory_report(model)
    if report is not None:
        metrics["memory"] = report.to_dict()
    plan = getattr(dist, "plan", None)
    if plan is not None:
        # The prediction beside what this run measured: the planner's error.
        step_ms = metrics["throughput"]["step_time_ms"]
        metrics["plan"] = {
            **plan.to_dict(),
            "measured": {
                "step_time_s": None if step_ms is None else step_ms / 1e3,
                "parameter_bytes_per_device": None if report is None else report.parameter_bytes,
                "optimizer_bytes_per_device": None if report is None else report.optimizer_bytes,
            },
        }
    return metrics


class Preempted(Exception):
    """Training stopped on SIGTERM after checkpointing at a step boundary.

    `tfscale-train` prints its message as one line and exits with 143
    (128 + SIGTERM), so a launcher or scheduler restarts it.
    """


def _check_step_checkpoints(config: ml_collections.ConfigDict) -> None:
    """Checkpoints inside an epoch need an input that can resume inside one."""
    options = config.data.dispatcher
    if not (config.training.checkpoint_every_steps and (options.address or options.embedded)):
        return
    try:
        cluster = cluster_lib.resolve("auto")
    except ValueError:
        return  # the distribution reports a bad cluster
    num_workers = cluster.num_workers if cluster is not None else 1
    if num_workers > 1 and options.equalize == "drop":
        raise config_lib.ConfigError(
            "config.training.checkpoint_every_steps needs an input position, which "
            "config.data.dispatcher.equalize='drop' does not keep (it holds elements back): "
            "use equalize='pad'. Received: "
            f"checkpoint_every_steps={config.training.checkpoint_every_steps} on {num_workers} "
            "workers"
        )


def _resized(
    config: ml_collections.ConfigDict, dist: distribution_base.Distribution, resume: dict[str, Any]
) -> ml_collections.ConfigDict:
    """The config for a run resumed on another number of replicas.

    `training.resize="keep_global_batch"` keeps the configured global batch
    (each replica's share changes); `"keep_per_replica_batch"` keeps the
    checkpointed run's per-replica batch, so the global batch (and with it
    the scaled learning rate) follows the replica count.
    """
    saved = resume.get("extra", {})
    if config.training.resize != "keep_per_replica_batch" or "per_replica_batch" not in saved:
        return config
    global_batch = saved["per_replica_batch"] * dist.num_replicas_in_sync
    if global_batch != config.training.global_batch_size:
        logging.info(
            "Resumed on %d replicas (was %d): global batch %d -> %d, per replica %d",
            dist.num_replicas_in_sync,
            saved["replicas"],
            config.training.global_batch_size,
            global_batch,
            saved["per_replica_batch"],
        )
    resized = config.copy_and_resolve_references()
    with resized.unlocked():
        resized.training.global_batch_size = global_batch
    return resized


class _ConsumedElements(keras.callbacks.Callback):
    """Counts the input elements this worker's training steps consumed in this fit.

    Runs after `BackupAndRestore` restored the optimizer's step counter.
    With `report`, passes the count on after every step (a dispatched input
    tells its dispatcher, so that a shard whose worker dies is read again
    from the first element not trained, and completes a shard once its last
    element was trained).
    """

    def __init__(self, per_worker_batch: int, report: Optional[Callable[[int], None]] = None):
        super().__init__()
        self._per_worker_batch = per_worker_batch
        self._start = 0
        self._report = report
        self._steps = 0  # steps of this fit so far
        self._epoch_base = 0

    def on_train_begin(self, logs: Any = None) -> None:
        self._start = int(self.model.optimizer.iterations.numpy())

    def on_train_end(self, logs: Any = None) -> None:
        if self._report is not None:
            self._report(self.count)  # exact, off the optimizer's counter

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch_base = self._steps

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # Counted here, not read off the optimizer: no device sync per step.
        self._steps = self._epoch_base + batch + 1
        if self._report is not None:
            self._report(self._steps * self._per_worker_batch)

    @property
    def count(self) -> int:
        return (int(self.model.optimizer.iterations.numpy()) - self._start) * self._per_worker_batch


@contextlib.contextmanager
def _precision(policy: str) -> Iterator[None]:
    """Builds the model under a Keras dtype policy; `compile` adds loss scaling for float16."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _check_workdir(workdir: str) -> None:
    """Fails now, not after the model is built, on a workdir that cannot be written.

    Creates nothing: a run that fails on its config leaves no workdir behind.
    """
    if not isinstance(workdir, str) or not workdir:
        raise config_lib.ConfigError(f"--workdir must be a directory path. Received: {workdir!r}")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = (
            "exists and" if existing == os.path.abspath(workdir) else f"is under {existing}, which"
        )
        raise config_lib.ConfigError(f"--workdir={workdir} {what} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise config_lib.ConfigError(
            f"--workdir={workdir} cannot be written ({existing}: {e.strerror or e})"
        ) from None


def _configure_devices(config: ml_collections.ConfigDict) -> None:
    try:
        devices.configure_devices(**config_lib.set_options(config.devices))
    except ValueError as e:
        raise config_lib.ConfigError(f"config.devices: {e}") from None


def _check_precision(precision: str) -> None:
    """Says so when float16 mixed precision will run emulated (no GPU): slower, not faster."""
    if precision == "mixed_float16" and devices.accelerator_type() == "CPU":
        logging.warning(
            "config.training.precision='mixed_float16' on a machine without a GPU: float16 "
            "math runs emulated on the CPU, slower than float32. Mixed float16 pays off on "
            "GPUs; on CPUs with bfloat16 units use 'mixed_bfloat16'"
        )


def _check_single_host(kind: str) -> None:
    """A one-host kind under a multi-worker cluster would run N independent chiefs.

    Raises:
      ValueError: when this process is one of several workers.
    """
    if distribution_lib.spans_hosts(kind):
        return
    cluster = cluster_lib.resolve("auto")
    if cluster is not None and cluster.num_workers > 1:
        raise ValueError(
            f"kind {kind!r} trains on one host, but this process is worker "
            f"{cluster.task_index} of {cluster.num_workers} (TF_CONFIG, Slurm or Kubernetes): "
            "each would train alone on the same checkpoints. Use "
            "--config.distribution.kind=multi_worker_mirrored, or dtensor with a mesh over "
            "every worker's devices"
        )


def _resume_state(backup_dir: str) -> dict[str, Any]:
    """The checkpoint state to resume ({} for a fresh run), its weights file checked."""
    try:
        return callbacks_lib.check_backup(backup_dir) or {}
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def _distribution(config: ml_collections.ConfigDict) -> distribution_base.Distribution:
    """The configured distribution; options of other kinds are dropped.

    A config file's preset for one kind (say a dtensor `mesh`) must not stop
    `--config.distribution.kind=mirrored` from the command line.
    """
    options = config_lib.set_options(config.distribution)
    kind = options.pop("kind")
    if kind == "auto":
        options.update(_auto_options(config))
    try:
        _check_single_host(kind)
        valid = distribution_lib.kind_options(kind)
        ignored = sorted(set(options) - set(valid))
        if ignored:
            logging.warning(
                "config.distribution: kind %r takes no %s; ignored", kind, ", ".join(ignored)
            )
        dist = distribution_lib.distribution(
            kind, **{k: v for k, v in options.items() if k in valid}
        )
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config.distribution: {e}") from None
    plan = getattr(dist, "plan", None)
    if plan is not None:
        logging.info("kind 'auto' chose %s:\n%s", plan.chosen.description, plan.table())
    return dist


def plan(config: ml_collections.ConfigDict, recalibrate: bool = False) -> planner.Plan:
    """The plan the `"auto"` kind follows for `config`, without training.

    Devices are configured as for `run`; the plan covers the model, optimizer
    and global batch of `config`, the devices of `config.distribution.devices`
    (default all) and its `memory_budget`, whatever the configured kind.

    Args:
      config: a config built on `tfscale.train.config.base_config()`.
      recalibrate: measure this machine's rates again instead of reading them
        from the cache.

    Raises:
      config_lib.ConfigError: for a bad config value or when no candidate fits.

    Example:

    ```python
    print(plan(config).table())
    ```
    """
    config_lib.validate(config)
    _configure_devices(config)
    options = config_lib.set_options(config.distribution)
    try:
        calibration = planner.calibrate(options.get("devices"), force=recalibrate)
        return planner.plan(
            **_auto_options(config),
            devices=options.get("devices"),
            memory_budget=options.get("memory_budget"),
            calibration=calibration,
        )
    except ValueError as e:
        raise config_lib.ConfigError(f"config.distribution: {e}") from None


def _auto_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the "auto" kind plans with: the model (as `_fit` builds it), optimizer and batch."""
    try:
        split = sources.load_split(
            config.data.source,
            config.data.train_split,
            cache_dir=config.data.cache_dir,
            tfds_data_dir=config.data.tfds_data_dir,
            download=config.data.download,
        )
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError(str(e)) from None

    def model_fn() -> keras.Model:
        with _precision(config.training.precision):
            return models.build(
                config.model.name, split.image_shape, split.num_classes, **config.model.kwargs
            )

    return {
        "model_fn": model_fn,
        "global_batch_size": config.training.global_batch_size,
        "optimizer": _optimizer(config, steps_per_epoch=1),
    }


def _optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> keras.optimizers.Optimizer:
    opt = config.optimizer
    learning_rate = schedules.scaled_learning_rate(
        opt.learning_rate,
        opt.reference_batch_size,
        config.training.global_batch_size,
        opt.scaling,
        warmup_steps=int(round(opt.warmup_epochs * steps_per_epoch)),
    )
    if opt.name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=opt.momentum)
    return keras.optimizers.Adam(learning_rate=learning_rate)


def _metrics(
    config: ml_collections.ConfigDict,
    dist: distribution_base.Distribution,
    resumed_from_epoch: int,
    epochs_run: int,
    epochs: list[dict[str, Any]],
    eval_logs: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json; `epochs` spans every run on the workdir (saved with the checkpoints)."""
    last = epochs[-1] if epochs else {}
    return {
        "kind": dist.kind,
        "replicas": dist.num_replicas_in_sync,
        "workers": dist.num_workers,
        "devices": list(dist.devices),
        "model": config.model.name,
        "source": config.data.source,
        "global_batch_size": config.training.global_batch_size,
        "precision": config.training.precision,
        "epochs": config.training.epochs,
        "resumed_from_epoch": resumed_from_epoch,
        "epochs_run": epochs_run,
        "train": {"loss": last.get("loss"), "accuracy": last.get("accuracy")},
        "eval": {k: float(v) for k, v in eval_logs.items()},
        "throughput": {
            "examples_per_sec": last.get("examples_per_sec"),
            "step_time_ms": last.get("step_time_ms"),
        },
        "history": epochs,
    }
