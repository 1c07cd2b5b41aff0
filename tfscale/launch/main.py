"""`tfscale-launch`: a torchrun-style launcher for multi-worker TensorFlow runs.

Usage: tfscale-launch [flags] -- COMMAND [ARGS ...]

Examples:

```
tfscale-launch --nproc_per_node=2 [--max_restarts=3] [--log_ranks=0|all|0,1] \\
    [--log_dir=DIR] -- tfscale-train --config=configs/default.py --workdir=/tmp/run \\
    --config.distribution.kind=multi_worker_mirrored
tfscale-launch --nnodes=2 --node_rank=R --master_addr=10.0.0.1 --master_port=29500 \\
    --nproc_per_node=1 -- CMD ...          # or --node_hosts=10.0.0.1,10.0.0.2
tfscale-launch --nnodes=2:4 --master_addr=10.0.0.1 --master_port=29500 -- CMD ...
                                            # elastic: 2 to 4 nodes, joining and leaving
tfscale-launch --emit=kubernetes --nnodes=4 --image=IMG --max_restarts=3 \\
    [--volume_claim=PVC | --volume_size=50Gi] [--cpu=8 --memory=32Gi --gpus=1] -- CMD ...
                                            # also --emit=tfjob, --emit=slurm
tfscale-launch --emit=marathon --nnodes=4 [--image=IMG] --master_port=31000 -- CMD ...
```

Each worker gets its TF_CONFIG (plus TFSCALE_RANK, TFSCALE_LOCAL_RANK,
TFSCALE_WORLD_SIZE, TFSCALE_RESTART). The console shows the output of the
ranks in `--log_ranks` (rank 0 by default), lines prefixed with `[rank]`;
every rank's output goes to `--log_dir/attempt<k>/rank<N>.log`. A failed
worker is named on stderr (rank, pid, signal, restart count) with its last
lines, and stops and restarts the whole group, up to `--max_restarts` times;
the exit code is non-zero when it still fails. With `--nnodes=MIN:MAX` the
job is elastic: each node's launcher joins a rendezvous at `--master_addr`
(served by the launcher there), training starts with MIN nodes, and a node
that joins or leaves makes every node stop and restart its workers with the
new ranks and world size (see tfscale/launch/elastic.py). An emitted Kubernetes or
TFJob manifest mounts a claim at the command's `--workdir` (or at
`--mount_path`, which must hold it), so restarted workers resume.
"""

from __future__ import annotations

import sys
from typing import Optional
from typing import Sequence

from absl import app
from absl import flags

from tfscale import cli
from tfscale.launch import elastic
from tfscale.launch import local
from tfscale.launch import manifests

_NPROC = flags.DEFINE_integer("nproc_per_node", 1, "Worker processes on this node.")
_NNODES = flags.DEFINE_string(
    "nnodes",
    "1",
    "Nodes taking part: N, or MIN:MAX for an elastic job (nodes join and leave; needs "
    "--master_addr).",
)
_RDZV_TIMEOUT = flags.DEFINE_float(
    "rendezvous_timeout_s", 300.0, "Elastic: how long to wait for MIN nodes before failing."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_float(
    "heartbeat_timeout_s", 10.0, "Elastic: a node whose launcher is silent this long has left."
)
_NODE_RANK = flags.DEFINE_integer("node_rank", 0, "This node's index.")
_NODE_HOSTS = flags.DEFINE_list("node_hosts", [], "Every node's host, by rank (nnodes > 1).")
_MASTER_ADDR = flags.DEFINE_string(
    "master_addr", None, "Host of node 0, where the nodes meet (nnodes > 1, without --node_hosts)."
)
_MASTER_PORT = flags.DEFINE_integer(
    "master_port", 29500, "Rendezvous port; worker of global rank r listens on it + 1 + r."
)
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "Group restarts after failures (in a manifest: restarts of each worker)."
)
_LOG_RANKS = flags.DEFINE_string(
    "log_ranks",
    "0",
    "Global ranks whose output the console shows: comma-separated, or `all`. Every rank's output "
    "goes to --log_dir/attempt<k>/rank<N>.log (k: restart count); without --log_dir, to a new "
    "temporary directory, unless --log_ranks=all.",
)
_EMIT = flags.DEFINE_enum(
    "emit",
    None,
    list(manifests.FORMATS),
    "Print a manifest for --nnodes workers instead of running.",
)
_IMAGE = flags.DEFINE_string(
    "image", None, "Container image (--emit=kubernetes|tfjob; optional for --emit=marathon)."
)
_NAME = flags.DEFINE_string("name", "tfscale", "Job name in an emitted manifest.")
_VOLUME_CLAIM = flags.DEFINE_string(
    "volume_claim", None, "Existing PersistentVolumeClaim holding the workdir (default: emit one)."
)
_VOLUME_SIZE = flags.DEFINE_string("volume_size", "10Gi", "Size of the emitted claim.")
_STORAGE_CLASS = flags.DEFINE_string("storage_class", None, "Storage class of the emitted claim.")
_MOUNT_PATH = flags.DEFINE_string(
    "mount_path", None, "Where the claim is mounted (default: the command's --workdir)."
)
_CPU = flags.DEFINE_string("cpu", None, "CPU request and limit of each worker pod, e.g. 8.")
_MEMORY = flags.DEFINE_string(
    "memory", None, "Memory request and limit of each worker pod, e.g. 32Gi."
)
_GPUS = flags.DEFINE_integer("gpus", 0, "GPUs (nvidia.com/gpu) of each worker pod or Slurm task.")
# What --help shows: this module's flags, and absl.logging's --log_dir, which the launcher uses.
_FLAGS = tuple(f.name for f in flags.FLAGS.get_flags_for_module(__name__)) + ("log_dir",)


def main(argv: Sequence[str]) -> None:
    command = list(argv[1:])
    if not command:
        raise app.UsageError("Give the worker command after `--`, e.g. -- tfscale-train ...")
    try:
        min_nodes, max_nodes = parse_nnodes(_NNODES.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if _EMIT.value:
        if max_nodes is not None:
            raise app.UsageError(
                f"--emit writes a fixed number of workers: give --nnodes=N. "
                f"Received: --nnodes={_NNODES.value}"
            )
        print(_manifest(command, min_nodes), end="")
        return
    try:
        config = local.LaunchConfig(
            nproc_per_node=_NPROC.value,
            nnodes=min_nodes,
            max_nodes=max_nodes,
            rendezvous_timeout_s=_RDZV_TIMEOUT.value,
            heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
            node_rank=_NODE_RANK.value,
            node_hosts=tuple(_NODE_HOSTS.value),
            master_addr=_MASTER_ADDR.value,
            master_port=_MASTER_PORT.value,
            max_restarts=_MAX_RESTARTS.value,
            log_ranks=local.parse_ranks(_LOG_RANKS.value),
            # absl.logging defines --log_dir; the launcher gives it the same
            # meaning, but only when given: absl's default comes from
            # $TEST_TMPDIR, which test runners such as bazel set.
            log_dir=flags.FLAGS.log_dir if flags.FLAGS["log_dir"].present else None,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if not config.elastic:
        sys.exit(local.launch(config, command))
    try:
        sys.exit(elastic.launch(config, command))
    except elastic.RendezvousTimeout as e:
        print(f"tfscale-launch: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def parse_nnodes(value: str) -> tuple[int, Optional[int]]:
    """`"4"` -> (4, None); `"2:4"` -> (2, 4) (elastic).

    Raises:
      ValueError: for anything else, naming it.
    """
    parts = value.strip().split(":")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        numbers = [int(p) for p in parts]
        if numbers[0] >= 1 and numbers[-1] >= numbers[0]:
            return numbers[0], (numbers[1] if len(numbers) == 2 else None)
    raise ValueError(
        f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX. Received: --nnodes={value}"
    )


def _manifest(command: list[str], nnodes: int) -> str:
    try:
        if _EMIT.value == "slurm":
            return manifests.slurm(
                nnodes,
                command,
                _NPROC.value,
                name=_NAME.value,
                port=_MASTER_PORT.value,
                max_restarts=_MAX_RESTARTS.value,
                gpus=_GPUS.value,
            )
        if _NPROC.value != 1:
            unit = "task" if _EMIT.value == "marathon" else "pod"
            raise ValueError(
                f"--emit={_EMIT.value} runs one worker per {unit}: use --nproc_per_node=1"
            )
        storage = manifests.Storage(
            claim=_VOLUME_CLAIM.value,
            size=_VOLUME_SIZE.value,
            storage_class=_STORAGE_CLASS.value,
            mount_path=_MOUNT_PATH.value,
        )
        resources = manifests.Resources(cpu=_CPU.value, memory=_MEMORY.value, gpus=_GPUS.value)
        return manifests.emit(
            _EMIT.value,
            nnodes,
            _IMAGE.value,
            command,
            name=_NAME.value,
            port=_MASTER_PORT.value,
            max_restarts=_MAX_RESTARTS.value,
            storage=storage,
            resources=resources,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def run_main() -> None:
    """Console-script entry point."""
    cli.run(main, cli.Usage(__doc__, flags=_FLAGS))


if __name__ == "__main__":
    run_main()
