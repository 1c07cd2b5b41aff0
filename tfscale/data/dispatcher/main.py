"""`tfscale-dispatcher`: serve shards, or show a dispatcher's status.

Usage:

```
tfscale-dispatcher serve --port=0 --work_dir=/tmp/dispatcher --policy=adaptive \\
    --shards='/data/train-*.tfrecord' [--job=train --num_epochs=3 --seed=0 \\
    --lease_timeout_s=30 --num_consumers=N --equalize=pad|drop \
    --auth_token_file=TOKEN --tls_cert_file=C --tls_key_file=K]
tfscale-dispatcher status --address=127.0.0.1:40123 [--auth_token_file=TOKEN]
```

`serve` prints `tfscale-dispatcher listening on HOST:PORT` once it accepts
connections. `--shards` is a file glob, `range:N:K` (N elements as shards of
K) or `tfds:NAME:SPLIT:N` (N equal slices of a TFDS split). A job given
again after a restart (same `--work_dir`) continues where it stopped.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags

from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import policies
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import shards as shards_lib

_PORT = flags.DEFINE_integer("port", 0, "Port to listen on; 0 picks a free one.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (loopback by default).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Journal and snapshots; empty: memory only.")
_POLICY = flags.DEFINE_enum("policy", "round_robin", sorted(policies.POLICIES), "Shard policy.")
_SHARDS = flags.DEFINE_string("shards", None, "File glob, range:N:K or tfds:NAME:SPLIT:N.")
_JOB = flags.DEFINE_string("job", "default", "Job name.")
_NUM_EPOCHS = flags.DEFINE_integer("num_epochs", 1, "Passes over the shards.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the per-epoch shard permutation.")
_LEASE_TIMEOUT_S = flags.DEFINE_float("lease_timeout_s", 30.0, "Lease timeout in seconds.")
_NUM_CONSUMERS = flags.DEFINE_integer(
    "num_consumers", 0, "Synchronous consumers to equalize (with --equalize)."
)
_EQUALIZE = flags.DEFINE_enum(
    "equalize", "none", list(core.EQUALIZE), "Equal element counts per epoch: pad or drop."
)
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", None, "File holding the auth token.")
_TLS_CERT_FILE = flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain (serve).")
_TLS_KEY_FILE = flags.DEFINE_string("tls_key_file", None, "PEM private key (serve).")
_TLS_ROOT_CERT_FILE = flags.DEFINE_string("tls_root_cert_file", None, "PEM root cert (status).")
_ADDRESS = flags.DEFINE_string("address", None, "Dispatcher address (status).")

_COMMANDS = ("serve", "status")


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[1] not in _COMMANDS:
        raise app.UsageError(f"Expected one command, {' or '.join(_COMMANDS)}. Received: {argv[1:]}")
    if argv[1] == "serve":
        serve()
    else:
        print(format_status(_client().status()))


def serve() -> None:
    """Starts the server, creates the job (if --shards) and blocks until SIGTERM/SIGINT."""
    config = server_lib.ServerConfig(
        port=_PORT.value,
        host=_HOST.value,
        work_dir=_WORK_DIR.value,
        auth_token=_read_token(),
        tls_cert_file=_TLS_CERT_FILE.value,
        tls_key_file=_TLS_KEY_FILE.value,
    )
    server = server_lib.DispatcherServer(config)
    if _SHARDS.value:
        spec = core.JobSpec(
            name=_JOB.value,
            shards=tuple(shards_lib.expand(_SHARDS.value, count_elements=_EQUALIZE.value != "none")),
            policy=_POLICY.value,
            num_epochs=_NUM_EPOCHS.value,
            seed=_SEED.value,
            lease_timeout_s=_LEASE_TIMEOUT_S.value,
            num_consumers=_NUM_CONSUMERS.value,
            equalize=_EQUALIZE.value,
        )
        try:
            server.core.create_job(spec)
        except core.DispatcherError as e:
            raise app.UsageError(str(e)) from None
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"tfscale-dispatcher listening on {server.target}", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        server.stop()


def format_status(status: object) -> str:
    """A human-readable table of a `StatusResponse`."""
    lines = [f"uptime {status.uptime_s:.1f}s, imbalance {status.imbalance:.3f} (max/mean completed)"]
    for job in status.jobs:
        lines.append(
            f"job {job.name} [{job.policy}]: epoch {min(job.epoch + 1, job.num_epochs)}/"
            f"{job.num_epochs}{' finished' if job.finished else ''}, shards {job.num_shards}: "
            f"{job.pending} pending, {job.leased} leased, {job.completed} completed; "
            f"{job.grants} grants"
        )
    lines.append(f"{'job':<12}{'worker':<16}{'live':<6}{'leases':>7}{'outstanding':>13}"
                 f"{'done':>7}{'done size':>11}{'size/s':>11}")
    for w in status.workers:
        lines.append(
            f"{w.job:<12}{w.worker:<16}{'yes' if w.live else 'no':<6}{w.leases:>7}"
            f"{w.outstanding:>13}{w.completed_shards:>7}{w.completed_size:>11}{w.throughput:>11.1f}"
        )
    return "\n".join(lines)


def _client() -> client_lib.DispatcherClient:
    if not _ADDRESS.value:
        raise app.UsageError("status needs --address=HOST:PORT")
    return client_lib.DispatcherClient(
        _ADDRESS.value,
        auth_token=_read_token(),
        tls_root_cert_file=_TLS_ROOT_CERT_FILE.value,
        unavailable_timeout_s=5.0,
    )


def _read_token() -> Optional[str]:
    try:
        return client_lib.read_token_file(_AUTH_TOKEN_FILE.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def run_main() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run_main()
