"""Appends records {"i": i} to a journal forever, printing each i once append() returns.

The kill -9 test in dispatcher_journal_test.py runs this as a subprocess:

    python tests/journal_writer.py WORK_DIR SNAPSHOT_EVERY

It snapshots {"count": i + 1} whenever the journal asks for one, so a kill can land in
the middle of a snapshot too.
"""

import sys

from tfscale.data.dispatcher import journal


def main(argv: list[str]) -> None:
    work_dir, snapshot_every = argv[1], int(argv[2])
    with journal.Journal(work_dir, fsync=True, snapshot_every=snapshot_every) as log:
        log.recover()
        i = 0
        while True:
            log.append({"i": i})
            print(i, flush=True)
            if log.should_snapshot():
                log.snapshot({"count": i + 1})
            i += 1


if __name__ == "__main__":
    main(sys.argv)
