"""A worker for the stop agreement test: steps in lockstep, proposes a stop on cue.

Usage: stop_agreement_worker.py INDEX ADDRESSES PROPOSE_AT [LATE]. Worker
INDEX of a `MultiWorkerMirroredStrategy` job on ADDRESSES (comma separated)
all-reduces once per step, proposes to stop at the boundary after step
PROPOSE_AT (-1: never), and prints `stopped STEP` at the boundary where the
agreement stops it (or `finished` after 50 steps). With LATE, it proposes
only after the others ended the fit (a SIGTERM at the last boundary), and
prints `finished` and the seconds the proposal took.
"""

import json
import os
import sys
import time

index, addresses, propose_at = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
os.environ["TF_CONFIG"] = json.dumps(
    {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
)

import tensorflow as tf  # noqa: E402  (after TF_CONFIG)

from tfscale import compat  # noqa: E402
from tfscale.train import preemption  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
agreement = preemption.StopAgreement(num_workers=len(addresses), ack_timeout_s=30)
agreement.begin()
late = len(sys.argv) > 4
for step in range(1, 51):
    # A collective per step: the workers run in lockstep, as training does.
    total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    assert float(total) == len(addresses), total
    if step == propose_at and not late:
        agreement.propose(step)
    if agreement.should_stop(step):
        print(f"stopped {step}", flush=True)
        break
else:
    if late:
        time.sleep(3)  # the other worker ends its fit meanwhile
        started = time.monotonic()
        agreement.propose(50)
        print(f"late proposal took {time.monotonic() - started:.1f} s", flush=True)
    print("finished", flush=True)
agreement.end()
# As tfscale-train's exit barrier does: task 0 leads the coordination service.
compat.wait_at_barrier("stop_agreement_worker_exit", 60_000)
