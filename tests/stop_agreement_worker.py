"""A worker for the stop agreement test: steps in lockstep, proposes a stop on cue.

Usage: stop_agreement_worker.py INDEX ADDRESSES PROPOSE_AT. Worker INDEX of a
`MultiWorkerMirroredStrategy` job on ADDRESSES (comma separated) all-reduces
once per step, proposes to stop at the boundary after step PROPOSE_AT (-1:
never), and prints `stopped STEP` at the boundary where the agreement stops
it (or `finished` after 50 steps).
"""

import json
import os
import sys

index, addresses, propose_at = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
os.environ["TF_CONFIG"] = json.dumps(
    {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
)

import tensorflow as tf  # noqa: E402  (after TF_CONFIG)

from tfscale.train import preemption  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
agreement = preemption.StopAgreement(num_workers=len(addresses), ack_timeout_s=30)
agreement.begin()
for step in range(1, 51):
    # A collective per step: the workers run in lockstep, as training does.
    total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    assert float(total) == len(addresses), total
    if step == propose_at:
        agreement.propose(step)
    if agreement.should_stop(step):
        print(f"stopped {step}", flush=True)
        break
else:
    print("finished", flush=True)
agreement.end()
