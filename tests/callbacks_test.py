"""Tests for tfscale.train.callbacks."""

import glob
import os

import numpy as np
from absl import logging
from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfscale.train import callbacks  # noqa: E402

STEPS = 4
BATCH = 8


def _data():
    x = np.random.default_rng(0).random((STEPS * BATCH, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, x @ np.array([1.0, -2.0, 0.5], "float32"))).batch(
        BATCH
    )


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _scalar_tags(log_dir):
    tags = set()
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


class ThroughputTest(absltest.TestCase):
    def test_records_each_epoch_and_writes_tensorboard(self):
        log_dir = self.create_tempdir().full_path
        throughput = callbacks.Throughput(global_batch_size=BATCH, log_dir=log_dir)
        history = _model().fit(_data(), epochs=2, callbacks=[throughput], verbose=0)
        self.assertEqual([e["epoch"] for e in throughput.epochs], [1, 2])
        for record in throughput.epochs:
            self.assertEqual(record["steps"], STEPS)
            self.assertAlmostEqual(record["examples_per_sec"], STEPS * BATCH / record["seconds"])
            self.assertGreater(record["step_time_ms"], 0)
            self.assertLessEqual(record["step_time_ms"] / 1000, record["seconds"])
        self.assertEqual(
            history.history["examples_per_sec"][1], throughput.epochs[1]["examples_per_sec"]
        )
        self.assertContainsSubset(
            {"throughput/examples_per_sec", "throughput/step_time_ms"}, _scalar_tags(log_dir)
        )

    def test_logs_progress_at_multiples_of_the_optimizer_step(self):
        model = _model()
        throughput = callbacks.Throughput(global_batch_size=BATCH, log_every_steps=3)
        with self.assertLogs(level="INFO") as logs:
            model.fit(_data(), epochs=2, callbacks=[throughput], verbose=0)
            # A later fit continues from the optimizer's step (as a resumed one).
            model.fit(_data(), epochs=1, callbacks=[throughput], verbose=0)
        lines = [r.getMessage() for r in logs.records if r.getMessage().startswith("step ")]
        self.assertEqual([int(line.split()[1].rstrip(":")) for line in lines], [3, 6, 9, 12])
        self.assertRegex(lines[0], r"^step 3: loss \d+\.\d{4}, \d+\.\d examples/s$")

    def test_a_negative_interval_is_refused(self):
        with self.assertRaisesRegex(ValueError, "log_every_steps must be an int >= 0. Received: "):
            callbacks.Throughput(global_batch_size=BATCH, log_every_steps=-1)


class BackupAndRestoreTest(absltest.TestCase):
    def test_resumes_at_the_saved_epoch_with_optimizer_state(self):
        backup_dir = self.create_tempdir().full_path
        first = _model(seed=0)
        first.fit(_data(), epochs=2, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0)
        state = callbacks.read_backup_state(backup_dir)
        self.assertEqual(state["epoch"], 2)
        self.assertEqual(state["weights"], "epoch-00002.weights.h5")

        # A fresh model (other init) asked for the same 2 epochs trains nothing
        # and holds exactly the saved weights and optimizer step.
        second = _model(seed=1)
        backup = callbacks.BackupAndRestore(backup_dir)
        history = second.fit(_data(), epochs=2, callbacks=[backup], verbose=0)
        self.assertEqual(backup.restored_epoch, 2)
        self.assertEqual(history.epoch, [])
        for a, b in zip(first.get_weights(), second.get_weights()):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(int(second.optimizer.iterations), 2 * STEPS)

        third = _model(seed=2)
        history = third.fit(
            _data(), epochs=3, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0
        )
        self.assertEqual(history.epoch, [2])
        self.assertEqual(int(third.optimizer.iterations), 3 * STEPS)
        self.assertEqual(callbacks.read_backup_state(backup_dir)["epoch"], 3)

    def test_a_later_fit_continues_from_its_own_checkpoint_without_reloading_it(self):
        backup_dir = self.create_tempdir().full_path
        model = _model()
        backup = callbacks.BackupAndRestore(backup_dir)
        model.fit(_data(), epochs=1, callbacks=[backup], verbose=0)
        with self.assertLogs(level="INFO") as logs:
            logging.info("second fit")  # so that something is logged
            history = model.fit(_data(), epochs=2, callbacks=[backup], verbose=0)
        self.assertEqual(history.epoch, [1])
        self.assertEqual(backup.restored_epoch, 1)
        messages = [r.getMessage() for r in logs.records]
        self.assertFalse([m for m in messages if m.startswith(("Restored", "Resumed"))], messages)
        # A new model (another process) restores it.
        fresh = _model(seed=1)
        with self.assertLogs(level="INFO") as logs:
            history = fresh.fit(
                _data(), epochs=3, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0
            )
        self.assertEqual(history.epoch, [2])
        self.assertIn("Restored epoch 2 (step 8)", "\n".join(r.getMessage() for r in logs.records))

    def test_keeps_the_last_checkpoints_only(self):
        backup_dir = self.create_tempdir().full_path
        backup = callbacks.BackupAndRestore(backup_dir, max_to_keep=2)
        _model().fit(_data(), epochs=4, callbacks=[backup], verbose=0)
        self.assertEqual(
            sorted(os.listdir(backup_dir)),
            ["epoch-00003.weights.h5", "epoch-00004.weights.h5", "state.json"],
        )

    def test_orphan_weights_from_a_crash_are_ignored(self):
        backup_dir = self.create_tempdir().full_path
        _model().fit(
            _data(), epochs=1, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0
        )
        # A crash after writing the next weights, before the state file moved on.
        with open(os.path.join(backup_dir, "epoch-00002.weights.h5"), "wb") as f:
            f.write(b"torn")
        backup = callbacks.BackupAndRestore(backup_dir)
        history = _model(seed=1).fit(_data(), epochs=2, callbacks=[backup], verbose=0)
        self.assertEqual(backup.restored_epoch, 1)
        self.assertEqual(history.epoch, [1])
        self.assertEqual(callbacks.read_backup_state(backup_dir)["epoch"], 2)

    def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(self):
        backup_dir = self.create_tempdir().full_path
        extras = []

        def extra(epoch, logs):
            extras.append(epoch)
            return {"position": epoch * 10}

        reference = _model()
        reference.fit(
            _data(), epochs=1, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0
        )
        expected = [w.copy() for w in reference.get_weights()]
        _model().fit(
            _data(),
            epochs=2,
            callbacks=[callbacks.BackupAndRestore(backup_dir, extra_state=extra)],
            verbose=0,
        )
        latest = os.path.join(backup_dir, "epoch-00002.weights.h5")
        with open(latest, "rb") as f:
            head = f.read(3000)
        with open(latest, "wb") as f:  # a full disk: the file ends early
            f.write(head)
        with self.assertLogs(level="WARNING") as logs:
            state = callbacks.check_backup(backup_dir)
        self.assertIn("epoch-00002.weights.h5 (epoch 2) cannot be read", logs.output[0])
        self.assertIn("resuming from epoch-00001.weights.h5 (epoch 1)", logs.output[0])
        self.assertEqual((state["epoch"], state["weights"]), (1, "epoch-00001.weights.h5"))
        self.assertNotIn("extra", state)  # epoch 1 was written without extra state

        model = _model(seed=1)
        backup = callbacks.BackupAndRestore(backup_dir, extra_state=extra)
        spy = []

        class Spy(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                spy.append([w.copy() for w in self.model.get_weights()])

        history = model.fit(_data(), epochs=2, callbacks=[backup, Spy()], verbose=0)
        self.assertEqual(backup.restored_epoch, 1)
        for a, b in zip(spy[0], expected):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(history.epoch, [1])  # epoch 2 trained again
        state = callbacks.read_backup_state(backup_dir)
        self.assertEqual(
            (state["epoch"], state["kept"]),
            (2, ["epoch-00001.weights.h5", "epoch-00002.weights.h5"]),
        )
        self.assertEqual(state["checkpoints"]["epoch-00002.weights.h5"]["extra"], {"position": 20})
        self.assertIsNone(callbacks._unreadable(latest))

    def test_no_readable_checkpoint_is_an_error_naming_the_files(self):
        backup_dir = self.create_tempdir().full_path
        _model().fit(
            _data(),
            epochs=2,
            callbacks=[callbacks.BackupAndRestore(backup_dir, max_to_keep=1)],
            verbose=0,
        )
        latest = os.path.join(backup_dir, "epoch-00002.weights.h5")
        with open(latest, "wb") as f:
            f.write(b"damaged")
        with self.assertRaisesRegex(
            ValueError, "epoch-00002.weights.h5 \\(epoch 2\\) cannot be read"
        ):
            callbacks.check_backup(backup_dir)

    def test_weights_are_written_under_a_temporary_name_then_renamed(self):
        backup_dir = self.create_tempdir().full_path
        seen = []
        real_save = keras.Model.save_weights

        def save_weights(model, path, **kwargs):
            seen.append(os.path.basename(path))
            real_save(model, path, **kwargs)
            self.assertFalse(os.path.exists(os.path.join(backup_dir, "epoch-00001.weights.h5")))

        model = _model()
        model.save_weights = lambda path, **kwargs: save_weights(model, path, **kwargs)
        model.fit(_data(), epochs=1, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0)
        self.assertEqual(seen, ["partial-epoch-00001.weights.h5"])
        self.assertEqual(sorted(os.listdir(backup_dir)), ["epoch-00001.weights.h5", "state.json"])

    def test_non_chief_restores_from_chief_and_writes_privately(self):
        backup_dir = self.create_tempdir().full_path
        _model().fit(
            _data(), epochs=1, callbacks=[callbacks.BackupAndRestore(backup_dir)], verbose=0
        )
        before = sorted(os.listdir(backup_dir))
        worker = callbacks.BackupAndRestore(backup_dir, is_chief=False)
        private = []

        class Spy(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                private.append(worker._write_dir)

        history = _model(seed=1).fit(_data(), epochs=2, callbacks=[worker, Spy()], verbose=0)
        self.assertEqual(worker.restored_epoch, 1)
        self.assertEqual(history.epoch, [1])
        self.assertEqual(sorted(os.listdir(backup_dir)), before)
        self.assertNotEqual(private[0], backup_dir)
        self.assertFalse(os.path.exists(private[0]))

    def test_bad_max_to_keep(self):
        with self.assertRaisesRegex(
            ValueError, "max_to_keep must be >= 1. Received: max_to_keep=0"
        ):
            callbacks.BackupAndRestore("/tmp/x", max_to_keep=0)


class TensorBoardTest(absltest.TestCase):
    def test_chief_writes_logs(self):
        log_dir = self.create_tempdir().full_path
        _model().fit(_data(), epochs=1, callbacks=[callbacks.TensorBoard(log_dir)], verbose=0)
        self.assertIn("epoch_loss", _scalar_tags(log_dir))

    def test_non_chief_writes_nothing_and_cleans_up(self):
        log_dir = os.path.join(self.create_tempdir().full_path, "tb")
        board = callbacks.TensorBoard(log_dir, is_chief=False)
        private = board.log_dir
        _model().fit(_data(), epochs=1, callbacks=[board], verbose=0)
        self.assertFalse(os.path.exists(log_dir))
        self.assertFalse(os.path.exists(private))


if __name__ == "__main__":
    absltest.main()
