"""A dispatcher worker process for the end-to-end tests.

Consumes `range:` shards through a ShardConsumer and appends each element it
hands on to OUT (one id per line, flushed), sleeping DELAY seconds per
element read (a simulated per-element cost). With HANG_AFTER=N, it hangs in
the read of its (N+1)th shard, after printing "HANGING", so the test can
kill -9 it while it holds a lease. With TRAIN_THEN_HANG=M, it reports each
element consumed to the dispatcher (synchronously) before writing it, and
hangs after writing M elements, printing "HANGING".

Usage: dispatcher_worker.py ADDRESS JOB WORKER OUT DELAY HANG_AFTER [TRAIN_THEN_HANG]
"""

import sys
import time

from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib


def main(address, job, worker, out, delay, hang_after, train_then_hang="-1"):
    delay, hang_after, train_then_hang = float(delay), int(hang_after), int(train_then_hang)
    reads = []

    def read(name):
        reads.append(name)
        if hang_after >= 0 and len(reads) > hang_after:
            print("HANGING", flush=True)
            time.sleep(3600)
        for element in readers.elements(name):
            time.sleep(delay)
            yield element

    client = client_lib.DispatcherClient(address)
    consumer = consumer_lib.ShardConsumer(client, job, worker, read, max_shards=1)
    with open(out, "a") as f:
        for count, element in enumerate(consumer, 1):
            if train_then_hang >= 0:
                consumer.report_consumed(count, send=True)
            f.write(f"{element}\n")
            f.flush()
            if count == train_then_hang:
                print("HANGING", flush=True)
                time.sleep(3600)
    print(f"DONE delivered={len(consumer.delivered)} lost={len(consumer.lost)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
