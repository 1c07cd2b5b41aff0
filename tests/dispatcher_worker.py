"""A dispatcher worker process for the end-to-end tests.

Consumes `range:` shards through a ShardConsumer and appends each element it
hands on to OUT (one id per line, flushed), sleeping DELAY seconds per
element read (a simulated per-element cost). With HANG_AFTER=N, it hangs in
the read of its (N+1)th shard, after printing "HANGING", so the test can
kill -9 it while it holds a lease.

Usage: dispatcher_worker.py ADDRESS JOB WORKER OUT DELAY HANG_AFTER
"""

import sys
import time

from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import feed as feed_lib
from tfscale.data.dispatcher import shards


def main(address, job, worker, out, delay, hang_after):
    delay, hang_after = float(delay), int(hang_after)
    reads = []

    def read(name):
        reads.append(name)
        if hang_after >= 0 and len(reads) > hang_after:
            print("HANGING", flush=True)
            time.sleep(3600)
        for element in shards.read(name):
            time.sleep(delay)
            yield element

    client = client_lib.DispatcherClient(address)
    consumer = feed_lib.ShardConsumer(client, job, worker, read, max_shards=1)
    with open(out, "a") as f:
        for element in consumer:
            f.write(f"{element}\n")
            f.flush()
    print(f"DONE delivered={len(consumer.delivered)} lost={len(consumer.lost)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
