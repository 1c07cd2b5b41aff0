"""`tfscale-launch`: a torchrun-style launcher for multi-worker TensorFlow runs.

Usage:

```
tfscale-launch --nproc_per_node=2 [--max_restarts=3] -- \\
    tfscale-train --config=configs/default.py --workdir=/tmp/run \\
    --config.distribution.kind=multi_worker_mirrored
tfscale-launch --nnodes=2 --node_rank=R --master_addr=10.0.0.1 --master_port=29500 \\
    --nproc_per_node=1 -- CMD ...          # or --node_hosts=10.0.0.1,10.0.0.2
tfscale-launch --emit=kubernetes --nnodes=4 --image=IMG -- CMD ...   # also tfjob, slurm
```

Each worker gets its TF_CONFIG (plus TFSCALE_RANK, TFSCALE_LOCAL_RANK,
TFSCALE_WORLD_SIZE, TFSCALE_RESTART); its output lines are prefixed with
`[rank]`. A failed worker stops and restarts the whole group, up to
`--max_restarts` times; the exit code is non-zero when it still fails.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app
from absl import flags

from tfscale.launch import local
from tfscale.launch import manifests

_NPROC = flags.DEFINE_integer("nproc_per_node", 1, "Worker processes on this node.")
_NNODES = flags.DEFINE_integer("nnodes", 1, "Nodes taking part.")
_NODE_RANK = flags.DEFINE_integer("node_rank", 0, "This node's index.")
_NODE_HOSTS = flags.DEFINE_list("node_hosts", [], "Every node's host, by rank (nnodes > 1).")
_MASTER_ADDR = flags.DEFINE_string(
    "master_addr", None, "Host of node 0, where the nodes meet (nnodes > 1, without --node_hosts)."
)
_MASTER_PORT = flags.DEFINE_integer(
    "master_port", 29500, "Rendezvous port; worker of global rank r listens on it + 1 + r."
)
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 0, "Group restarts after failures.")
_EMIT = flags.DEFINE_enum(
    "emit", None, list(manifests.FORMATS), "Print a manifest for --nnodes workers instead of running."
)
_IMAGE = flags.DEFINE_string("image", None, "Container image (--emit=kubernetes|tfjob).")
_NAME = flags.DEFINE_string("name", "tfscale", "Job name in an emitted manifest.")


def main(argv: Sequence[str]) -> None:
    command = list(argv[1:])
    if not command:
        raise app.UsageError("Give the worker command after `--`, e.g. -- tfscale-train ...")
    if _EMIT.value:
        print(_manifest(command), end="")
        return
    hosts = tuple(_NODE_HOSTS.value)
    try:
        config = local.LaunchConfig(
            nproc_per_node=_NPROC.value,
            nnodes=_NNODES.value,
            node_rank=_NODE_RANK.value,
            node_hosts=hosts,
            master_addr=_MASTER_ADDR.value,
            master_port=_MASTER_PORT.value,
            max_restarts=_MAX_RESTARTS.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    sys.exit(local.launch(config, command))


def _manifest(command: list[str]) -> str:
    try:
        if _EMIT.value == "slurm":
            return manifests.slurm(
                _NNODES.value, command, _NPROC.value, name=_NAME.value, port=_MASTER_PORT.value
            )
        if _NPROC.value != 1:
            raise ValueError(f"--emit={_EMIT.value} runs one worker per pod: use --nproc_per_node=1")
        extra = {"port": _MASTER_PORT.value} if _EMIT.value == "kubernetes" else {}
        return manifests.emit(_EMIT.value, _NNODES.value, _IMAGE.value, command, name=_NAME.value, **extra)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def run_main() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run_main()
