"""`tfscale-dispatcher`: serve shards, or show a dispatcher's status.

Usage: tfscale-dispatcher serve|status [flags]

Examples:

```
tfscale-dispatcher serve --port=0 --work_dir=/tmp/dispatcher --policy=adaptive \\
    --shards='/data/train-*.tfrecord' [--job=train --num_epochs=3 --seed=0 \\
    --lease_timeout_s=30 --num_consumers=N --equalize=pad|drop \\
    --snapshot_interval=10000 --restore_grace_s=10 \\
    --auth_token_file=TOKEN --tls_cert_file=C --tls_key_file=K]
tfscale-dispatcher status --address=127.0.0.1:40123 [--auth_token_file=TOKEN]
```

`serve` prints `tfscale-dispatcher listening on HOST:PORT` once it accepts
connections. `--shards` is a file glob, `range:N:K` (N elements as shards of
K) or `tfds:NAME:SPLIT:N` (N equal slices of a TFDS split). A job given
again after a restart (same `--work_dir`) continues where it stopped.

A command that fails prints one line, `tfscale-dispatcher: CAUSE`, and exits
with 2 for a bad command line (an unknown command or flag, a bad flag value,
a bad `--shards` spec or job) or 1 for anything else (an unreachable or
refusing dispatcher, an unreadable file, an address that cannot be bound).
`tfscale-dispatcher COMMAND --help` shows the flags of one command.
"""

from __future__ import annotations

import math
import os
import signal
import socket
from typing import NoReturn
from typing import Optional
from typing import Sequence

# A `--shards` glob imports TensorFlow, whose C++ start-up chatter would bury
# the one line a failure prints; TF_CPP_MIN_LOG_LEVEL=0 brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
from absl import flags  # noqa: E402

from tfscale import cli  # noqa: E402
from tfscale.data.dispatcher import auth  # noqa: E402
from tfscale.data.dispatcher import client as client_lib  # noqa: E402
from tfscale.data.dispatcher import journal as journal_lib  # noqa: E402
from tfscale.data.dispatcher import policies  # noqa: E402
from tfscale.data.dispatcher import server as server_lib  # noqa: E402
from tfscale.data.dispatcher import shards as shards_lib  # noqa: E402
from tfscale.data.dispatcher import types  # noqa: E402

_PORT = flags.DEFINE_integer(
    "port", 0, "Port to listen on; 0 picks a free one.", lower_bound=0, upper_bound=65535
)
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
    "equalize", "none", list(types.EQUALIZE), "Equal element counts per epoch: pad or drop."
)
_SNAPSHOT_INTERVAL = flags.DEFINE_integer(
    "snapshot_interval",
    server_lib.ServerConfig.snapshot_every,
    "Journal records between snapshots (serve); recovery replays at most this many.",
    lower_bound=1,
)
_RESTORE_GRACE_S = flags.DEFINE_float(
    "restore_grace_s",
    server_lib.ServerConfig.restore_grace_s,
    "Seconds a lease restored after a restart lives at least (serve).",
)
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", None, "File holding the auth token.")
_TLS_CERT_FILE = flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain (serve).")
_TLS_KEY_FILE = flags.DEFINE_string("tls_key_file", None, "PEM private key (serve).")
_TLS_ROOT_CERT_FILE = flags.DEFINE_string("tls_root_cert_file", None, "PEM root cert (status).")
_ADDRESS = flags.DEFINE_string("address", None, "Dispatcher address, HOST:PORT (status).")

_SERVE_USAGE = cli.Usage(
    """`tfscale-dispatcher serve`: serve shards to workers until SIGTERM or SIGINT.

Usage: tfscale-dispatcher serve [--port=0] [--work_dir=DIR] [--shards=SPEC] [flags]

Example:

tfscale-dispatcher serve --port=0 --work_dir=/tmp/dispatcher --policy=adaptive \\
    --shards='/data/train-*.tfrecord' --job=train --num_epochs=3

Prints `tfscale-dispatcher listening on HOST:PORT` once it accepts
connections. `--shards` (a file glob, `range:N:K` or `tfds:NAME:SPLIT:N`)
creates the job `--job`; a job given again after a restart (same
`--work_dir`) continues where it stopped.
""",
    flags=(
        "port",
        "host",
        "work_dir",
        "policy",
        "shards",
        "job",
        "num_epochs",
        "seed",
        "lease_timeout_s",
        "num_consumers",
        "equalize",
        "snapshot_interval",
        "restore_grace_s",
        "auth_token_file",
        "tls_cert_file",
        "tls_key_file",
    ),
)
_STATUS_USAGE = cli.Usage(
    """`tfscale-dispatcher status`: show the jobs and workers of a running dispatcher.

Usage: tfscale-dispatcher status --address=HOST:PORT [flags]

Example:

tfscale-dispatcher status --address=127.0.0.1:40123 --auth_token_file=TOKEN

An unreachable address is retried for 5 s before the command fails.
""",
    flags=("address", "auth_token_file", "tls_root_cert_file"),
)

_PROG = "tfscale-dispatcher"
_COMMANDS = ("serve", "status")
_UNAVAILABLE_TIMEOUT_S = 5.0
# Lower-case substrings of gRPC's UNAVAILABLE details, and the cause each names.
_UNAVAILABLE_CAUSES = (
    ("connection refused", "connection refused"),
    ("resolving", "the host name does not resolve"),
    ("handshake", "the TLS handshake failed"),
    ("socket closed", "the connection was closed (not a dispatcher, or TLS on one side only?)"),
    ("settings frame", "it accepted the connection but does not speak gRPC (not a dispatcher?)"),
)


def main(argv: Sequence[str]) -> None:
    try:
        if len(argv) != 2 or argv[1] not in _COMMANDS:
            received = " ".join(argv[1:]) or "none"
            raise cli.BadUsage(
                f"expected one command, {' or '.join(_COMMANDS)}. Received: {received}"
            )
        if argv[1] == "serve":
            serve()
        else:
            status()
    except cli.CommandError as e:
        _exit(str(e), e.exit_code)


def serve() -> None:
    """Starts the server, creates the job (if --shards) and blocks until SIGTERM/SIGINT."""
    config = server_lib.ServerConfig(
        port=_PORT.value,
        host=_HOST.value,
        work_dir=_WORK_DIR.value,
        auth_token=_read_token(),
        tls_cert_file=_TLS_CERT_FILE.value,
        tls_key_file=_TLS_KEY_FILE.value,
        snapshot_every=_SNAPSHOT_INTERVAL.value,
        restore_grace_s=_RESTORE_GRACE_S.value,
    )
    try:
        server = server_lib.DispatcherServer(config)  # recovers the journal in work_dir
    except OSError as e:
        raise cli.CommandError(f"cannot use --work_dir={config.work_dir}: {_os_cause(e)}") from None
    except journal_lib.JournalCorruptError as e:
        raise cli.CommandError(f"cannot recover --work_dir={config.work_dir}: {e}") from None
    if _SHARDS.value:
        try:
            server.core.create_job(_job_spec())
        except types.DispatcherError as e:
            raise cli.BadUsage(str(e)) from None
    _start(server, config)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"{_PROG} listening on {server.target}", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        server.stop()


def status() -> None:
    """Prints the status of the dispatcher at --address."""
    if not _ADDRESS.value:
        raise cli.BadUsage("status needs --address=HOST:PORT")
    address = _ADDRESS.value
    token = _read_token()
    try:
        client = client_lib.DispatcherClient(
            address,
            auth_token=token,
            tls_root_cert_file=_TLS_ROOT_CERT_FILE.value,
            unavailable_timeout_s=_UNAVAILABLE_TIMEOUT_S,
        )
    except OSError as e:
        raise cli.CommandError(f"cannot read --tls_root_cert_file: {_os_cause(e)}") from None
    try:
        print(format_status(client.status()))
    except grpc.RpcError as e:
        raise _rpc_failure(e, address) from None
    except types.DispatcherError as e:
        raise cli.CommandError(f"the dispatcher at {address} refused the request: {e}") from None
    finally:
        client.close()


def format_status(status: types.DispatcherStatus) -> str:
    """A human-readable table of a dispatcher's status."""
    lines = [
        f"uptime {status.uptime_s:.1f}s, imbalance {status.imbalance:.3f} (max/mean completed)"
    ]
    for job in status.jobs:
        lines.append(
            f"job {job.name} [{job.policy}]: epoch {min(job.epoch + 1, job.num_epochs)}/"
            f"{job.num_epochs}{' finished' if job.finished else ''}, shards {job.num_shards}: "
            f"{job.pending} pending, {job.leased} leased, {job.completed} completed; "
            f"{job.grants} grants"
        )
    lines.append(
        f"{'job':<12}{'worker':<16}{'live':<6}{'leases':>7}{'outstanding':>13}"
        f"{'done':>7}{'done size':>11}{'size/s':>11}"
    )
    for w in status.workers:
        lines.append(
            f"{w.job:<12}{w.worker:<16}{'yes' if w.live else 'no':<6}{w.leases:>7}"
            f"{w.outstanding:>13}{w.completed_shards:>7}{w.completed_size:>11}{w.throughput:>11.1f}"
        )
    if status.omitted_workers:
        lines.append(f"... and {status.omitted_workers} more workers")
    return "\n".join(lines)


def _job_spec() -> types.JobSpec:
    try:
        shards = shards_lib.expand(_SHARDS.value, count_elements=_EQUALIZE.value != "none")
    except ValueError as e:
        raise cli.BadUsage(f"--shards: {e}") from None
    except OSError as e:
        raise cli.CommandError(f"cannot read --shards={_SHARDS.value}: {_os_cause(e)}") from None
    return types.JobSpec(
        name=_JOB.value,
        shards=tuple(shards),
        policy=_POLICY.value,
        num_epochs=_NUM_EPOCHS.value,
        seed=_SEED.value,
        lease_timeout_s=_LEASE_TIMEOUT_S.value,
        num_consumers=_NUM_CONSUMERS.value,
        equalize=_EQUALIZE.value,
    )


def _start(server: server_lib.DispatcherServer, config: server_lib.ServerConfig) -> None:
    try:
        server.start()
    except ValueError as e:  # A TLS certificate without a key, or the reverse.
        raise cli.BadUsage(str(e)) from None
    except OSError as e:
        if e.filename is None:
            raise _bind_failure(config) from None
        raise cli.CommandError(f"cannot read the TLS files: {_os_cause(e)}") from None
    except RuntimeError:  # gRPC's failure to bind.
        raise _bind_failure(config) from None


def _bind_failure(config: server_lib.ServerConfig) -> cli.CommandError:
    """Names why gRPC could not listen, by binding a plain socket the same way."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(sockaddr)
    except OSError as e:  # socket.gaierror too: a host that does not resolve
        cause = e.strerror or str(e)
    else:
        cause = (
            "the TLS certificate or key is not valid" if config.tls_cert_file else "gRPC refused"
        )
    return cli.CommandError(f"cannot listen on {config.host}:{config.port}: {cause}")


def _rpc_failure(error: grpc.RpcError, address: str) -> cli.CommandError:
    """One line for a failed call: unreachable, refused, or too slow."""
    code = error.code()
    details = " ".join((error.details() or "").split())
    if code == grpc.StatusCode.UNAVAILABLE:
        cause = next((c for key, c in _UNAVAILABLE_CAUSES if key in details.lower()), details)
        return cli.CommandError(
            f"cannot reach a dispatcher at {address}: {cause} (after {_UNAVAILABLE_TIMEOUT_S:g} s)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return cli.CommandError(f"the dispatcher at {address} did not answer in time")
    hint = " (check --auth_token_file)" if code == grpc.StatusCode.UNAUTHENTICATED else ""
    return cli.CommandError(f"the dispatcher at {address} answered {code.name}: {details}{hint}")


def _read_token() -> Optional[str]:
    try:
        return auth.read_token_file(_AUTH_TOKEN_FILE.value)
    except OSError as e:
        raise cli.CommandError(f"cannot read --auth_token_file: {_os_cause(e)}") from None
    except ValueError as e:
        raise cli.BadUsage(str(e)) from None


def _os_cause(error: OSError) -> str:
    """`No such file or directory: '/x'` rather than `[Errno 2] ...`."""
    if error.strerror and error.filename:
        return f"{error.strerror}: {error.filename!r}"
    return error.strerror or str(error)


def _is_host_port(address: Optional[str]) -> bool:
    if address is None:
        return True
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


flags.register_validator(_ADDRESS, _is_host_port, message="expected HOST:PORT, PORT in [1, 65535]")
# `math.isfinite` as well: absl parses `inf` and `nan` as floats.
flags.register_validator(
    _RESTORE_GRACE_S,
    lambda seconds: math.isfinite(seconds) and seconds >= 0,
    message="expected a finite number of seconds >= 0",
)


def _exit(message: str, code: int) -> NoReturn:
    cli.fail(_PROG, message, code)


def run_main() -> None:
    """Console-script entry point."""
    commands = {"serve": _SERVE_USAGE, "status": _STATUS_USAGE}
    cli.run(main, cli.Usage(__doc__), commands=commands, flags_parser=cli.one_line_flags(_PROG))


if __name__ == "__main__":
    run_main()
