"""Keras callbacks for distributed runs: throughput, checkpoints, TensorBoard.

Every worker of a synchronous run must execute the same callbacks, but only
the chief may write the shared outputs. The chief-aware callbacks here take
`is_chief`: the chief writes to the directory given, the other workers to a
private temporary directory that is removed when training ends.

Example:

```python
callbacks = [
    Throughput(global_batch_size=256, log_dir=workdir + "/tensorboard"),
    BackupAndRestore(workdir + "/checkpoints", is_chief=dist.is_chief),
    TensorBoard(workdir + "/tensorboard", is_chief=dist.is_chief),
]
model.fit(data, epochs=10, callbacks=callbacks)  # re-run: resumes
```
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from typing import Any
from typing import Callable
from typing import Optional

import h5py
import keras
import tensorflow as tf
from absl import logging

from tfscale import compat
from tfscale.train import files
from tfscale.train import preemption

__all__ = [
    "BackupAndRestore",
    "TensorBoard",
    "Throughput",
    "check_backup",
    "log_evaluation",
    "read_backup_state",
]

Logs = Optional[dict[str, Any]]

_STATE_FILE = "state.json"


class Throughput(keras.callbacks.Callback):
    """Measures examples/s and step time per epoch; logs progress every few steps.

    Adds `examples_per_sec` and `step_time_ms` (median step) to the epoch
    logs, so they appear in the progress bar and in `History`; logs them;
    and writes them to TensorBoard under `throughput/` when `log_dir` is set.
    With `log_every_steps`, it also logs a line each time the optimizer step
    passes a multiple of it: `step 1200: loss 0.0421, 2310.5 examples/s`
    (the rate since the previous line), so a long epoch shows progress in
    a log, and a crash's log says the last step done.

    Example:

    ```python
    throughput = Throughput(global_batch_size=128, log_every_steps=100)
    model.fit(dataset, epochs=3, callbacks=[throughput])
    throughput.epochs[-1]["examples_per_sec"]
    ```

    Attributes:
      epochs: one dict per finished epoch: `epoch`, `steps`, `seconds`,
        `examples_per_sec`, `step_time_ms`.
    """

    def __init__(
        self, global_batch_size: int, log_dir: Optional[str] = None, log_every_steps: int = 0
    ):
        super().__init__()
        if not isinstance(log_every_steps, int) or log_every_steps < 0:
            raise ValueError(
                f"log_every_steps must be an int >= 0. Received: log_every_steps={log_every_steps!r}"
            )
        self.global_batch_size = global_batch_size
        self.log_dir = log_dir
        self.log_every_steps = log_every_steps
        self.epochs: list[dict[str, float]] = []
        self._writer: Optional[tf.summary.SummaryWriter] = None
        self._step_times: list[float] = []
        self._step: Optional[int] = None  # the optimizer's, once read in a fit
        self._logged = (0, 0.0)  # (step, time) of the latest progress line

    def on_train_begin(self, logs: Logs = None) -> None:
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "throughput"))
        self._step = None  # read at the first step (after a restore)

    def on_epoch_begin(self, epoch: int, logs: Logs = None) -> None:
        self._step_times = []
        self._epoch_start = time.perf_counter()
        self._last_step_end = self._epoch_start

    def on_train_batch_begin(self, batch: int, logs: Logs = None) -> None:
        self._step_start = time.perf_counter()
        self._first_step = batch

    def on_train_batch_end(self, batch: int, logs: Logs = None) -> None:
        # One call covers the steps first..batch (several with Keras's
        # steps_per_execution); the time is per step.
        self._last_step_end = time.perf_counter()
        steps = batch - self._first_step + 1
        self._step_times.extend([(self._last_step_end - self._step_start) / steps] * steps)
        if self.log_every_steps:
            self._log_progress(steps, logs)

    def _log_progress(self, steps: int, logs: Logs) -> None:
        if self._step is None:  # one read per fit: the step after this batch
            self._step = int(self.model.optimizer.iterations.numpy())
            self._logged = (self._step - steps, self._step_start)
        else:
            self._step += steps
        previous, since = self._logged
        if self._step // self.log_every_steps == previous // self.log_every_steps:
            return
        rate = (self._step - previous) * self.global_batch_size / (self._last_step_end - since)
        loss = (logs or {}).get("loss")
        loss_text = f"loss {float(loss):.4f}, " if loss is not None else ""
        logging.info("step %d: %s%.1f examples/s", self._step, loss_text, rate)
        self._logged = (self._step, self._last_step_end)

    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        steps = len(self._step_times)
        if not steps:
            return
        seconds = self._last_step_end - self._epoch_start
        record = {
            "epoch": epoch + 1,
            "steps": steps,
            "seconds": seconds,
            "examples_per_sec": steps * self.global_batch_size / seconds,
            "step_time_ms": 1000.0 * statistics.median(self._step_times),
        }
        self.epochs.append(record)
        if logs is not None:
            logs["examples_per_sec"] = record["examples_per_sec"]
            logs["step_time_ms"] = record["step_time_ms"]
        logging.info(
            "epoch %d: %.1f examples/s, median step %.2f ms over %d steps",
            epoch + 1,
            record["examples_per_sec"],
            record["step_time_ms"],
            steps,
        )
        if self._writer is not None:
            with self._writer.as_default():
                tf.summary.scalar("throughput/examples_per_sec", record["examples_per_sec"], epoch)
                tf.summary.scalar("throughput/step_time_ms", record["step_time_ms"], epoch)
            self._writer.flush()

    def on_train_end(self, logs: Logs = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class BackupAndRestore(keras.callbacks.Callback):
    """Checkpoints the model and optimizer each epoch; `fit` resumes from it.

    Unlike `keras.callbacks.BackupAndRestore`, the state is never torn by a
    crash (each epoch's weights are written to a temporary file renamed into
    place, then a small state file is atomically replaced to point at it),
    only the chief writes to `backup_dir`, and checkpoints are kept after
    training, so a re-run on the same directory continues where the last one
    stopped. A latest checkpoint that cannot be read (a full disk, a file
    damaged after the write) does not block the restart: the newest readable
    one kept beside it is restored instead, with a warning (see
    `check_backup`).

    Checkpoints inside an epoch: every `every_steps` steps, and at the step
    boundary after a SIGTERM (what Kubernetes and Slurm send before an
    eviction): the callback saves, stops training (`preempted` is then
    True) and puts the old signal handler back. With several workers, a
    SIGTERM to any of them stops all of them after the same step
    (`preemption.StopAgreement`), so their checkpoints agree and none is
    left waiting in a collective. Their state says how far
    into its epoch they are (`"step_in_epoch"`, and `"step"`, the optimizer
    step); `fit` cannot start inside an epoch, so the caller resumes such a
    checkpoint by a `fit` of the epoch's remaining steps on the input after
    the consumed part (`tfscale.train.lib` does), with
    `first_epoch_offset` set to the steps already done.

    Args:
      backup_dir: where the checkpoints go (on the chief).
      is_chief: whether this worker writes to `backup_dir`.
      max_to_keep: checkpoints kept.
      extra_state: called at each checkpoint with the completed epoch count
        and the epoch's logs (None for a checkpoint inside an epoch); its
        JSON-able result is saved with the checkpoint (under `"extra"` in
        `read_backup_state`), e.g. the input position of a dispatched dataset
        or the history of the epochs so far.
      every_steps: also checkpoint every this many steps (0: at epoch ends
        only); with `steps_per_execution`, at the first step boundary Keras
        reports past each multiple.
      stop_on_sigterm: checkpoint and stop at the next step boundary on
        SIGTERM (when `fit` runs in the main thread).
      num_workers: the job's worker processes (`Distribution.num_workers`):
        with more than one, a SIGTERM stops every worker at one agreed step.

    Attributes:
      restored_epoch: the epoch count restored at the start of the last
        `fit` (0 for a fresh start).
      restored_step_in_epoch: steps of the next epoch the restored
        checkpoint had trained (0 at an epoch boundary).
      preempted: whether the last `fit` stopped on SIGTERM.
      first_epoch_offset: steps of its first epoch the coming `fit` does not
        run (set by the caller that resumes inside an epoch).

    Example:

    ```python
    backup = BackupAndRestore("/tmp/run/checkpoints")
    model.fit(data, epochs=4, callbacks=[backup])  # killed in epoch 3
    model.fit(data, epochs=4, callbacks=[backup])  # restarts at epoch 3
    ```
    """

    def __init__(
        self,
        backup_dir: str,
        is_chief: bool = True,
        max_to_keep: int = 2,
        extra_state: Optional[Callable[[int, Logs], dict[str, Any]]] = None,
        every_steps: int = 0,
        stop_on_sigterm: bool = True,
        num_workers: int = 1,
    ):
        super().__init__()
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1. Received: max_to_keep={max_to_keep}")
        if every_steps < 0:
            raise ValueError(f"every_steps must be >= 0. Received: every_steps={every_steps}")
        self.backup_dir = backup_dir
        self.is_chief = is_chief
        self.max_to_keep = max_to_keep
        self.every_steps = every_steps
        self.restored_epoch = 0
        self.restored_step_in_epoch = 0
        self.preempted = False
        self.first_epoch_offset = 0
        self._extra_state = extra_state
        self._write_dir = backup_dir if is_chief else None
        self._stop_on_sigterm = stop_on_sigterm
        self._sigterm = threading.Event()
        self._agreement = preemption.StopAgreement(num_workers)
        self._previous_handler: Any = None
        self._fit_start_step = 0
        self._steps_in_fit = 0
        self._epoch = 0
        self._epoch_start = 0  # steps of this fit before the current epoch
        self._epoch_offset = 0  # steps of the current epoch before this fit
        self._last_saved = -1
        self._resumed_unsaid = False

    def on_train_begin(self, logs: Logs = None) -> None:
        if not self.is_chief and self._write_dir is None:
            self._write_dir = tempfile.mkdtemp(prefix="tfscale-backup-")
        self.preempted = False
        # A SIGTERM that came between two fits (e.g. after the rest of a
        # resumed epoch) stops the next one.
        self._steps_in_fit = 0
        if self._stop_on_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._agreement.begin()
        state = check_backup(self.backup_dir)
        self.restored_epoch = 0
        self.restored_step_in_epoch = 0
        # The checkpoint this callback saved at the model's step (a fit after
        # the rest of a resumed epoch): the model holds it already.
        held = (
            state is not None
            and state.get("step") == self._last_saved
            and int(self.model.optimizer.iterations.numpy()) == self._last_saved
        )
        if state is not None:
            self.restored_epoch = state["epoch"]
            self.restored_step_in_epoch = state.get("step_in_epoch", 0)
            compat.set_initial_epoch(self.model, self.restored_epoch)
        if state is not None and not held:
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(os.path.join(self.backup_dir, state["weights"]))
            where = f"epoch {self.restored_epoch}"
            if self.restored_step_in_epoch:
                where += f" and {self.restored_step_in_epoch} steps"
            logging.info(
                "Restored %s (step %s) from %s", where, state.get("step", "?"), self.backup_dir
            )
        self._resumed_unsaid = state is not None and not held
        self._fit_start_step = int(self.model.optimizer.iterations.numpy())

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
        self._sigterm.set()

    def on_epoch_begin(self, epoch: int, logs: Logs = None) -> None:
        self._epoch = epoch
        self._epoch_start = self._steps_in_fit
        self._epoch_offset = self.first_epoch_offset if epoch == self.restored_epoch else 0

    def on_train_batch_end(self, batch: int, logs: Logs = None) -> None:
        previous = self._steps_in_fit
        self._steps_in_fit = self._epoch_start + batch + 1
        step = self._fit_start_step + self._steps_in_fit
        if self._resumed_unsaid:
            # The input skipped, the step compiled: when a restart is over.
            logging.info("Resumed training: step %d done", step)
            self._resumed_unsaid = False
        due = self.every_steps and (
            step // self.every_steps > (self._fit_start_step + previous) // self.every_steps
        )
        if self._sigterm.is_set():
            self._agreement.propose(step)
        if self._agreement.should_stop(step):
            self._save_inside_epoch(step, self._epoch_offset + batch + 1)
            logging.warning("SIGTERM: stopped after step %d, its checkpoint saved", step)
            self.preempted = True
            self._sigterm.clear()
            self.model.stop_training = True
        elif due:
            self._save_inside_epoch(step, self._epoch_offset + batch + 1)

    def _save_inside_epoch(self, step: int, step_in_epoch: int) -> None:
        if step == self._last_saved:
            return
        extra = self._extra_state(self._epoch, None) if self._extra_state is not None else None
        self._save(
            f"step-{step:09d}.weights.h5",
            {"epoch": self._epoch, "step_in_epoch": step_in_epoch, "step": step},
            extra,
        )
        self._last_saved = step

    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        if self.preempted:
            return  # stopped inside the epoch: that checkpoint is the latest
        step = self._fit_start_step + self._steps_in_fit
        extra = None
        if self._extra_state is not None:
            extra = self._extra_state(epoch + 1, dict(logs or {}))
        self._save(f"epoch-{epoch + 1:05d}.weights.h5", {"epoch": epoch + 1, "step": step}, extra)
        self._last_saved = step

    def _save(self, name: str, position: dict[str, int], extra: Optional[dict[str, Any]]) -> None:
        """Writes the weights under `name` (atomically), then the state pointing at them."""
        os.makedirs(self._write_dir, exist_ok=True)
        path = os.path.join(self._write_dir, name)
        # Keras names the format by the suffix: the temporary file keeps it.
        partial = os.path.join(self._write_dir, f"partial-{name}")
        self.model.save_weights(partial, overwrite=True)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
        try:
            previous = read_backup_state(self._write_dir)
        except (OSError, ValueError):
            previous = None
        kept = [k for k in (previous or {}).get("kept", []) if k != name]
        kept = (kept + [name])[-self.max_to_keep :]
        own: dict[str, Any] = dict(position)
        if extra is not None:
            own["extra"] = extra
        # Each kept checkpoint's own state, for a fall back to it (check_backup).
        earlier = (previous or {}).get("checkpoints", {})
        checkpoints = {k: earlier[k] for k in kept if k != name and k in earlier}
        checkpoints[name] = own
        state: dict[str, Any] = {**own, "weights": name, "kept": kept, "checkpoints": checkpoints}
        files.write_json_atomic(os.path.join(self._write_dir, _STATE_FILE), state)
        for old in (previous or {}).get("kept", []):
            if old not in kept:
                _remove(os.path.join(self._write_dir, old))

    def on_train_end(self, logs: Logs = None) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
            self._agreement.end()
        self.first_epoch_offset = 0
        if not self.is_chief and self._write_dir is not None:
            shutil.rmtree(self._write_dir, ignore_errors=True)
            self._write_dir = None


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` that only the chief writes to `log_dir`.

    Other workers log to a private temporary directory removed at the end.
    Per-step scalars (`update_freq=N`) are numbered by the optimizer's step,
    so a resumed run continues the curves where the checkpoint left them.
    """

    def __init__(self, log_dir: str, is_chief: bool = True, **kwargs: Any):
        self._private_dir = None if is_chief else tempfile.mkdtemp(prefix="tfscale-tensorboard-")
        super().__init__(log_dir=self._private_dir or log_dir, **kwargs)

    def on_train_begin(self, logs: Logs = None) -> None:
        super().on_train_begin(logs)
        # Keras counts from 0 in every fit; the restored step count continues.
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())

    def on_train_end(self, logs: Logs = None) -> None:
        super().on_train_end(logs)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)


def log_evaluation(log_dir: str, logs: dict[str, Any], step: int) -> None:
    """Writes evaluation results to TensorBoard as `eval/<name>` at `step`.

    Example:

    ```python
    log_evaluation(workdir + "/tensorboard", model.evaluate(data, return_dict=True),
                   int(model.optimizer.iterations))
    ```
    """
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "eval"))
    with writer.as_default():
        for name, value in logs.items():
            tf.summary.scalar(f"eval/{name}", float(value), step=step)
    writer.close()


def read_backup_state(backup_dir: str) -> Optional[dict[str, Any]]:
    """The state `BackupAndRestore` left in `backup_dir`, or `None`.

    Returns:
      `{"epoch": completed epochs, "weights": file name, "kept": [...]}`,
      plus `"extra"` when the callback had `extra_state`.
    """
    path = os.path.join(backup_dir, _STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_backup(backup_dir: str) -> Optional[dict[str, Any]]:
    """The state to resume from: `read_backup_state`'s, or an older kept checkpoint's.

    Run before the model is built, so a damaged checkpoint is known at once,
    not as an h5py error after minutes of start-up. When the latest weights
    file cannot be read (a truncated or damaged file), the newest readable
    checkpoint kept beside it is returned instead (its own epoch and
    `"extra"`), with a warning naming both files.

    Raises:
      ValueError: the state file cannot be read, or no kept checkpoint can;
        naming the files and what to do about it.
    """
    try:
        state = read_backup_state(backup_dir)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Checkpoint state {os.path.join(backup_dir, _STATE_FILE)} cannot be read ({e}); "
            "remove the checkpoints directory to start over"
        ) from None
    if state is None:
        return None
    latest = str(state.get("weights"))
    problem = _unreadable(os.path.join(backup_dir, latest))
    if problem is None:
        return state
    saved = state.get("checkpoints", {})
    for name in reversed(state.get("kept", [])):
        if name == latest or name not in saved:
            continue
        if _unreadable(os.path.join(backup_dir, name)) is None:
            fallback = {
                k: v for k, v in state.items() if k not in ("extra", "step", "step_in_epoch")
            }
            fallback.update(saved[name], weights=name)
            warning = (backup_dir, latest, name)
            if warning not in _WARNED:
                _WARNED.add(warning)
                logging.warning(
                    "Checkpoint %s (epoch %s) cannot be read (%s); resuming from %s (epoch %s)",
                    os.path.join(backup_dir, latest),
                    state.get("epoch"),
                    problem,
                    name,
                    fallback["epoch"],
                )
            return fallback
    raise ValueError(
        f"Checkpoint {os.path.join(backup_dir, latest)} (epoch {state.get('epoch')}) cannot be "
        f"read: {problem}, and no older readable checkpoint is kept beside it "
        f"({state.get('kept')}). Restore it, or remove {backup_dir} to start over"
    )


# (backup dir, damaged file, fallback) already warned about: the check runs twice per start.
_WARNED: set[tuple[str, str, str]] = set()


def _unreadable(path: str) -> Optional[str]:
    """Why the weights file at `path` cannot be read, or None if it can."""
    try:
        with h5py.File(path, "r") as f:
            f.visit(lambda name: None)  # walks the index: a truncated file fails here
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
