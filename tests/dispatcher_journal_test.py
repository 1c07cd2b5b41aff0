"""Tests for tfscale.data.dispatcher.journal."""

import os
import signal
import subprocess
import sys
import threading
import zlib

from absl.testing import absltest
from absl.testing import parameterized

import tfscale
from tfscale.data.dispatcher import journal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tfscale.__file__)))
WRITER = os.path.join(REPO_ROOT, "tests", "journal_writer.py")


def _records(start, stop):
    return [{"i": i} for i in range(start, stop)]


def _write(work_dir, records, snapshots=(), **kwargs):
    """Appends `records` to a fresh journal, snapshotting {"n": n} after the n-th in `snapshots`."""
    with journal.Journal(work_dir, **kwargs) as log:
        log.recover()
        for n, record in enumerate(records, start=1):
            log.append(record)
            if n in snapshots:
                log.snapshot({"n": n})


def _recover(work_dir, **kwargs):
    with journal.Journal(work_dir, **kwargs) as log:
        return log.recover()


def _segment(work_dir, seq):
    return os.path.join(work_dir, f"journal-{seq:012d}.log")


def _snapshot(work_dir, seq):
    return os.path.join(work_dir, f"snapshot-{seq:012d}.json")


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _data_files(work_dir):
    """The journal's segments and snapshots, without its lock file."""
    return sorted(n for n in os.listdir(work_dir) if n != journal.LOCK_FILE)


def _line_offsets(path):
    """Byte offsets at which the lines of a file start."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    return offsets[:-1]


class JournalTest(parameterized.TestCase):

    def test_round_trip(self):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 10))
        self.assertEqual(_recover(work_dir), (None, _records(0, 10)))

    def test_snapshot_then_tail(self):
        work_dir = self.create_tempdir().full_path
        with journal.Journal(work_dir) as log:
            log.recover()
            for record in _records(0, 5):
                log.append(record)
            log.snapshot({"n": 5})
            for record in _records(5, 8):
                log.append(record)
            # The segment before the first snapshot stays: the fallback if snapshot 1 breaks.
            self.assertEqual(
                _data_files(work_dir),
                [
                    "journal-000000000001.log",
                    "journal-000000000002.log",
                    "snapshot-000000000001.json",
                ],
            )
            log.snapshot({"n": 8})
            log.append({"i": 8})
        self.assertEqual(
            _data_files(work_dir),
            [
                "journal-000000000002.log",
                "journal-000000000003.log",
                "snapshot-000000000001.json",
                "snapshot-000000000002.json",
            ],
        )
        self.assertEqual(_recover(work_dir), ({"n": 8}, [{"i": 8}]))

    def test_recover_returns_snapshot_and_tail(self):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 8), snapshots={5})
        self.assertEqual(_recover(work_dir), ({"n": 5}, _records(5, 8)))

    def test_recovery_is_bounded_by_snapshots(self):
        work_dir = self.create_tempdir().full_path
        with journal.Journal(work_dir, fsync=False, snapshot_every=1000) as log:
            log.recover()
            for i in range(10_500):
                log.append({"i": i})
                if log.should_snapshot():
                    log.snapshot({"count": i + 1})
        state, records = _recover(work_dir)
        self.assertEqual(state, {"count": 10_000})
        self.assertEqual(records, _records(10_000, 10_500))
        names = os.listdir(work_dir)
        self.assertLessEqual(len([n for n in names if n.startswith("journal-")]), 2)
        self.assertLessEqual(len([n for n in names if n.startswith("snapshot-")]), 2)

    @parameterized.named_parameters(
        ("half_checksum", lambda line: line[:7]),
        ("checksum_and_part_of_length", lambda line: line[:10]),
        ("half_payload", lambda line: line[: len(line) // 2]),
        ("line_without_newline", lambda line: line[:-1]),
        ("half_line_then_zeros", lambda line: line[: len(line) // 2] + b"\0" * 40),
        ("zeros", lambda line: b"\0" * 30),
    )
    def test_torn_last_record_is_dropped_and_truncated(self, tear):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 3))
        with open(_segment(work_dir, 1), "rb") as f:
            line = f.read().splitlines(keepends=True)[0]
        with open(_segment(work_dir, 1), "ab") as f:
            f.write(tear(line))
        self.assertEqual(_recover(work_dir), (None, _records(0, 3)))
        with journal.Journal(work_dir) as log:
            log.recover()
            log.append({"i": 3})
        self.assertEqual(_recover(work_dir), (None, _records(0, 4)))

    @parameterized.named_parameters(
        ("bad_crc", lambda line: b"00000000" + line[8:]),
        ("bad_json", lambda line: b"%08x 1 {\n" % zlib.crc32(b"{")),
        ("longer_than_its_length", lambda line: line[:-1] + b"x"),
        ("garbage", lambda line: b"not a record"),
    )
    def test_complete_or_impossible_last_line_raises(self, damage):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 3))
        path = _segment(work_dir, 1)
        with open(path, "rb") as f:
            line = f.read().splitlines(keepends=True)[0]
        size = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(damage(line))
        with self.assertRaisesRegex(journal.JournalCorruptError, f"{path} at byte offset {size}"):
            _recover(work_dir)
        self.assertGreater(os.path.getsize(path), size)  # Nothing was truncated.

    @parameterized.named_parameters(
        ("payload", 15),
        ("final_newline", -1),
    )
    def test_corrupt_complete_last_record_raises(self, byte_in_line):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 3))
        path = _segment(work_dir, 1)
        offset = _line_offsets(path)[2]
        _flip_byte(path, offset + byte_in_line if byte_in_line >= 0 else os.path.getsize(path) - 1)
        with self.assertRaisesRegex(journal.JournalCorruptError, f"{path} at byte offset {offset}"):
            _recover(work_dir)

    def test_flipped_newline_between_the_last_two_records_raises(self):
        # Dropping both records as a torn write would lose an acknowledged grant and let
        # the next one reuse its fencing token.
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 3))
        path = _segment(work_dir, 1)
        offset = _line_offsets(path)[1]
        _flip_byte(path, _line_offsets(path)[2] - 1)
        with self.assertRaisesRegex(journal.JournalCorruptError, f"{path} at byte offset {offset}"):
            _recover(work_dir)

    @parameterized.named_parameters(
        ("crc", 0),
        ("length", 9),
        ("payload", 15),
    )
    def test_corrupt_middle_record_raises(self, byte_in_line):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 3))
        path = _segment(work_dir, 1)
        offset = _line_offsets(path)[1]
        _flip_byte(path, offset + byte_in_line)
        with self.assertRaisesRegex(journal.JournalCorruptError, f"{path} at byte offset {offset}"):
            _recover(work_dir)

    def test_corrupt_newest_snapshot_falls_back_to_previous(self):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 6), snapshots={2, 5})
        _flip_byte(_snapshot(work_dir, 2), 20)
        self.assertEqual(_recover(work_dir), ({"n": 2}, _records(2, 6)))

    def test_corrupt_only_snapshot_falls_back_to_the_start(self):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 4), snapshots={2})
        _flip_byte(_snapshot(work_dir, 1), 20)
        self.assertEqual(_recover(work_dir), (None, _records(0, 4)))

    @parameterized.named_parameters(
        ("flipped_byte", lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:]),
        ("truncated", lambda data: data[: len(data) // 2]),
        ("empty", lambda data: b""),
    )
    def test_no_usable_snapshot_raises(self, damage):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 9), snapshots={3, 6, 9})
        for seq in (2, 3):
            with open(_snapshot(work_dir, seq), "rb") as f:
                data = f.read()
            with open(_snapshot(work_dir, seq), "wb") as f:
                f.write(damage(data))
        with self.assertRaisesRegex(journal.JournalCorruptError, "snapshot-000000000003.json"):
            _recover(work_dir)

    def test_recovery_after_fallback_prunes_the_corrupt_snapshot(self):
        work_dir = self.create_tempdir().full_path
        _write(work_dir, _records(0, 6), snapshots={2, 5})
        _flip_byte(_snapshot(work_dir, 2), 20)
        with journal.Journal(work_dir) as log:
            state, records = log.recover()
            self.assertEqual(log.records_since_snapshot, len(records))
            log.snapshot({"n": 6})
        self.assertNotIn("snapshot-000000000002.json", os.listdir(work_dir))
        self.assertEqual(_recover(work_dir), ({"n": 6}, []))

    def test_torn_batch_recovers_a_prefix(self):
        source_dir = self.create_tempdir().full_path
        with journal.Journal(source_dir) as log:
            log.recover()
            log.append_many(_records(0, 5))
            start = os.path.getsize(_segment(source_dir, 1))
            log.append_many(_records(5, 10))
        with open(_segment(source_dir, 1), "rb") as f:
            data = f.read()
        for cut in range(start, len(data) + 1):
            work_dir = self.create_tempdir().full_path
            with open(_segment(work_dir, 1), "wb") as f:
                f.write(data[:cut])
            state, records = _recover(work_dir)
            self.assertIsNone(state)
            self.assertEqual(records, _records(0, len(records)), f"cut={cut}")
            self.assertGreaterEqual(len(records), 5, f"cut={cut}")
        self.assertEqual(len(records), 10)

    def test_records_since_snapshot_counts_appends_and_replays(self):
        work_dir = self.create_tempdir().full_path
        with journal.Journal(work_dir, snapshot_every=3) as log:
            log.recover()
            log.append({"i": 0})
            log.append_many(_records(1, 3))
            self.assertEqual(log.records_since_snapshot, 3)
            self.assertTrue(log.should_snapshot())
            log.snapshot({"n": 3})
            self.assertEqual(log.records_since_snapshot, 0)
            self.assertFalse(log.should_snapshot())
            log.append({"i": 3})
        with journal.Journal(work_dir, snapshot_every=3) as log:
            log.recover()
            self.assertEqual(log.records_since_snapshot, 1)

    @parameterized.named_parameters(
        ("without_snapshots", 10**9),
        ("with_snapshots", 37),
    )
    def test_records_survive_kill_9(self, snapshot_every):
        work_dir = self.create_tempdir().full_path
        stderr = self.create_tempfile()
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        with open(stderr.full_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, WRITER, work_dir, str(snapshot_every)],
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO_ROOT,
                env=env,
            )
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        printed = []
        try:
            while not printed or printed[-1] < 200:
                line = proc.stdout.readline()
                self.assertTrue(line, f"The writer died: {stderr.read_text()}")
                printed.append(int(line))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            watchdog.cancel()
            proc.kill()
            proc.stdout.close()
        self.assertEqual(printed, list(range(len(printed))))
        state, records = _recover(work_dir)
        start = state["count"] if state else 0
        self.assertEqual(records, _records(start, start + len(records)))
        self.assertGreater(start + len(records), printed[-1])

    @parameterized.named_parameters(("zero", 0), ("negative", -5))
    def test_invalid_snapshot_every_raises(self, snapshot_every):
        with self.assertRaisesRegex(ValueError, f"snapshot_every={snapshot_every}"):
            journal.Journal(self.create_tempdir().full_path, snapshot_every=snapshot_every)

    @parameterized.named_parameters(
        ("append", lambda log: log.append({"i": 0})),
        ("append_many", lambda log: log.append_many([{"i": 0}])),
        ("snapshot", lambda log: log.snapshot({})),
    )
    def test_write_before_recover_raises(self, write):
        log = journal.Journal(self.create_tempdir().full_path)
        with self.assertRaisesRegex(RuntimeError, r"recover\(\) must be called first"):
            write(log)

    def test_recover_twice_raises(self):
        with journal.Journal(self.create_tempdir().full_path) as log:
            log.recover()
            with self.assertRaisesRegex(RuntimeError, "called already"):
                log.recover()

    @parameterized.named_parameters(
        ("not_a_dict", [1, 2]),
        ("not_json", {"x": object()}),
        ("nan", {"x": float("nan")}),
    )
    def test_bad_record_raises(self, record):
        with journal.Journal(self.create_tempdir().full_path) as log:
            log.recover()
            with self.assertRaisesRegex(ValueError, "Received"):
                log.append(record)

    def test_a_second_journal_on_a_directory_fails_until_the_first_closes(self):
        work_dir = self.create_tempdir().full_path
        first = journal.Journal(work_dir)
        first.recover()
        first.mark_holder("serving 127.0.0.1:5000")
        second = journal.Journal(work_dir)
        with self.assertRaisesRegex(
            journal.WorkDirLockedError,
            f"in use by another dispatcher \\(pid {os.getpid()} on .*, serving 127.0.0.1:5000\\)",
        ):
            second.recover()
        first.append({"i": 0})
        first.close()
        self.assertEqual(second.recover(), (None, [{"i": 0}]))
        second.close()

    def test_close_is_idempotent_and_ends_writing(self):
        work_dir = self.create_tempdir().full_path
        log = journal.Journal(work_dir)
        log.recover()
        log.append({"i": 0})
        log.close()
        log.close()
        with self.assertRaisesRegex(RuntimeError, "closed"):
            log.append({"i": 1})
        self.assertEqual(_recover(work_dir), (None, [{"i": 0}]))


if __name__ == "__main__":
    absltest.main()
