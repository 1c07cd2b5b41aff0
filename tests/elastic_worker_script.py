"""A worker for the elastic launch tests: records its round, then waits for a finish file.

Usage: elastic_worker_script.py OUT_DIR. Appends one JSON line (rank, world
size, round, TF_CONFIG) to OUT_DIR/records.jsonl, then exits 0 once
OUT_DIR/finish exists (or 143 on SIGTERM, as a stopped worker does). With
ELASTIC_FAIL=R, the worker of rank R exits 3 at once in every round (a
crashing worker); with ELASTIC_FAIL_ROUNDS=K, only in the first K rounds.
"""

import json
import os
import sys
import time

out = sys.argv[1]
record = {
    "rank": int(os.environ["TFSCALE_RANK"]),
    "world": int(os.environ["TFSCALE_WORLD_SIZE"]),
    "round": int(os.environ["TFSCALE_RESTART"]),
    "workers": json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"],
    "pid": os.getpid(),
}
with open(os.path.join(out, "records.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
fail = os.environ.get("ELASTIC_FAIL")
rounds = int(os.environ.get("ELASTIC_FAIL_ROUNDS", "1000000"))
if fail is not None and record["rank"] == int(fail) and record["round"] < rounds:
    sys.exit(3)
while not os.path.exists(os.path.join(out, "finish")):
    time.sleep(0.1)
