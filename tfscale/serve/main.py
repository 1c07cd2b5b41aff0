"""`tfscale-serve`: real-time inference of a trained model over balanced replicas.

Usage: tfscale-serve [serve] --model=PATH [--replicas=N] [flags]
       tfscale-serve replica --model=PATH [flags]
       tfscale-serve reload|status --address=HOST:PORT

Examples:

```
tfscale-serve --model=/tmp/tfscale/smoke --replicas=2 --policy=least_loaded --port=0
tfscale-serve --replica_addresses=10.0.0.5:8500,10.0.0.6:8500 --port=8500
tfscale-serve replica --model=/models/lenet --host=0.0.0.0 --port=8500 --rest_port=8501
tfscale-serve reload --address=127.0.0.1:8500
```

`serve` (the default command) starts `--replicas` replica processes on
this host, each loading `--model` (a `tfscale-train` workdir's latest
checkpoint, a `.keras` file or a SavedModel) and warming it up, or puts
the router in front of `--replica_addresses` (each started with
`tfscale-serve replica`). Once every replica is ready it prints
`tfscale-serve listening on HOST:PORT` (gRPC: TF Serving's
PredictionService and ModelService, grpc.health.v1) and `tfscale-serve
rest on HOST:PORT` (`POST /v1/models/NAME:predict`, `/metrics`,
`/healthz`, `/readyz`). A replica that dies is restarted and gets no
request meanwhile. A newer checkpoint in the workdir (checked every
`--watch_interval_s`) or `tfscale-serve reload` rolls over the replicas one
at a time, with no failed request.

A command that fails prints one line, `tfscale-serve: CAUSE`, and exits
with 2 for a bad command line or 1 for anything else.
`tfscale-serve COMMAND --help` shows the flags of one command.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import NoReturn
from typing import Optional
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tfscale import cli  # noqa: E402
from tfscale.data.dispatcher import auth  # noqa: E402
from tfscale.serve import admin  # noqa: E402
from tfscale.serve import batching  # noqa: E402
from tfscale.serve import proxy  # noqa: E402
from tfscale.serve import replicas  # noqa: E402
from tfscale.serve import routing  # noqa: E402
from tfscale.serve import supervisor  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Workdir, .keras file or SavedModel to serve.")
_MODEL_NAME = flags.DEFINE_string("model_name", "default", "The model name clients ask for.")
_REPLICAS = flags.DEFINE_integer("replicas", 1, "Replica processes on this host.", lower_bound=1)
_REPLICA_ADDRESSES = flags.DEFINE_list(
    "replica_addresses", [], "HOST:PORT of replicas started elsewhere (instead of --replicas)."
)
_POLICY = flags.DEFINE_enum("policy", "least_loaded", list(routing.POLICIES), "Routing policy.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (loopback by default).")
_PORT = flags.DEFINE_integer(
    "port", 0, "gRPC port; 0 picks a free one.", lower_bound=0, upper_bound=65535
)
_REST_PORT = flags.DEFINE_integer(
    "rest_port", 0, "REST port; 0 picks a free one, -1 serves none.", lower_bound=-1
)
_NAME = flags.DEFINE_string("name", "replica-0", "Replica name in metrics (replica).")
_BATCHING = flags.DEFINE_boolean("batching", True, "Dynamic batching in each replica.")
_MAX_BATCH_SIZE = flags.DEFINE_integer(
    "max_batch_size", 32, "Most rows in one batch.", lower_bound=1
)
_MAX_QUEUE_DELAY_MS = flags.DEFINE_float(
    "max_queue_delay_ms", 2.0, "Longest wait of a request for others to join its batch."
)
_ALLOWED_BATCH_SIZES = flags.DEFINE_list(
    "allowed_batch_sizes",
    [],
    "Padded batch sizes, ending at --max_batch_size (default: powers of 2).",
)
_MAX_QUEUE_SIZE = flags.DEFINE_integer(
    "max_queue_size", 1024, "Requests waiting at most; more get RESOURCE_EXHAUSTED.", lower_bound=1
)
_NUM_BATCH_THREADS = flags.DEFINE_integer(
    "num_batch_threads", 1, "Batches computed at once per replica.", lower_bound=1
)
_SLOWDOWN = flags.DEFINE_float(
    "slowdown", 1.0, "Each batch takes this many times its compute time (drills, benchmarks)."
)
_WATCH_INTERVAL_S = flags.DEFINE_float(
    "watch_interval_s", 10.0, "Seconds between checks for a newer checkpoint; 0: never."
)
_OUTLIER_LATENCY_FACTOR = flags.DEFINE_float(
    "outlier_latency_factor",
    3.0,
    "Eject a replica whose latency is this many times its peers' median; inf: never.",
)
_RETRIES = flags.DEFINE_integer(
    "retries", 2, "Other replicas tried after an unreachable or full one.", lower_bound=0
)
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", None, "File holding the auth token.")
_TLS_CERT_FILE = flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain (gRPC TLS).")
_TLS_KEY_FILE = flags.DEFINE_string("tls_key_file", None, "PEM private key.")
_TLS_ROOT_CERT_FILE = flags.DEFINE_string(
    "tls_root_cert_file", None, "PEM root certificate to reach TLS replicas or a TLS router."
)
_ADDRESS = flags.DEFINE_string("address", None, "Router or replica, HOST:PORT (reload, status).")

_PROG = "tfscale-serve"
_COMMANDS = ("serve", "replica", "reload", "status")
_BATCH_FLAGS = (
    "batching",
    "max_batch_size",
    "max_queue_delay_ms",
    "allowed_batch_sizes",
    "max_queue_size",
    "num_batch_threads",
)
_SECURITY_FLAGS = ("auth_token_file", "tls_cert_file", "tls_key_file")
_SERVE_USAGE = cli.Usage(
    """`tfscale-serve serve`: a router in front of local or remote replicas.

Usage: tfscale-serve [serve] --model=PATH [--replicas=N] [flags]

Example:

tfscale-serve --model=/tmp/tfscale/smoke --replicas=2 --policy=least_loaded --port=0

Prints `tfscale-serve listening on HOST:PORT` and `tfscale-serve rest on
HOST:PORT` once every replica is ready.
""",
    flags=(
        "model",
        "model_name",
        "replicas",
        "replica_addresses",
        "policy",
        "outlier_latency_factor",
        "host",
        "port",
        "rest_port",
        *_BATCH_FLAGS,
        "watch_interval_s",
        "retries",
        *_SECURITY_FLAGS,
        "tls_root_cert_file",
    ),
)
_REPLICA_USAGE = cli.Usage(
    """`tfscale-serve replica`: one replica, for a router on another host.

Usage: tfscale-serve replica --model=PATH [--port=0] [--rest_port=0] [flags]

Example:

tfscale-serve replica --model=/models/lenet --host=0.0.0.0 --port=8500 --rest_port=8501

Prints `tfscale-serve replica listening on HOST:PORT` and `tfscale-serve
replica rest on HOST:PORT` once the model is warm.
""",
    flags=(
        "model",
        "model_name",
        "name",
        "host",
        "port",
        "rest_port",
        *_BATCH_FLAGS,
        "slowdown",
        *_SECURITY_FLAGS,
    ),
)
_RELOAD_USAGE = cli.Usage(
    """`tfscale-serve reload`: roll the newest model over a router's replicas.

Usage: tfscale-serve reload --address=HOST:PORT

Example:

tfscale-serve reload --address=127.0.0.1:8500
""",
    flags=("address", "auth_token_file", "tls_root_cert_file"),
)
_STATUS_USAGE = cli.Usage(
    """`tfscale-serve status`: the replicas of a router, or a replica's model.

Usage: tfscale-serve status --address=HOST:PORT

Example:

tfscale-serve status --address=127.0.0.1:8500
""",
    flags=("address", "auth_token_file", "tls_root_cert_file"),
)


def main(argv: Sequence[str]) -> None:
    try:
        command = argv[1] if len(argv) > 1 else "serve"
        if len(argv) > 2 or command not in _COMMANDS:
            received = " ".join(argv[1:])
            raise cli.BadUsage(
                f"expected one command, {', '.join(_COMMANDS)}. Received: {received}"
            )
        {"serve": serve, "replica": replica, "reload": reload, "status": status}[command]()
    except cli.CommandError as e:
        _exit(str(e), e.exit_code)


def batching_options() -> Optional[batching.BatchingOptions]:
    """The batching flags as options (None with --nobatching)."""
    if not _BATCHING.value:
        return None
    try:
        sizes = tuple(int(s) for s in _ALLOWED_BATCH_SIZES.value) or None
        return batching.BatchingOptions(
            max_batch_size=_MAX_BATCH_SIZE.value,
            max_queue_delay_ms=_MAX_QUEUE_DELAY_MS.value,
            allowed_batch_sizes=sizes,
            max_queue_size=_MAX_QUEUE_SIZE.value,
            num_batch_threads=_NUM_BATCH_THREADS.value,
        )
    except ValueError as e:
        raise cli.BadUsage(str(e)) from None


def _check_model_flag() -> str:
    if not _MODEL.value:
        raise cli.BadUsage(
            "--model is required: a tfscale-train workdir, a .keras file or a SavedModel"
        )
    if not os.path.exists(_MODEL.value):
        raise cli.BadUsage(f"--model={_MODEL.value}: no such file or directory")
    return _MODEL.value


def _rest_port() -> Optional[int]:
    return None if _REST_PORT.value < 0 else _REST_PORT.value


def replica() -> None:
    """Loads, warms up and serves the model until SIGTERM or SIGINT."""
    path = _check_model_flag()
    # Imported here: the router and the other commands start without TensorFlow.
    from tfscale.serve import model as model_lib
    from tfscale.serve import replica as replica_lib

    try:
        options = _replica_options(replica_lib)
    except ValueError as e:
        raise cli.BadUsage(str(e)) from None
    server = replica_lib.ReplicaServer(
        lambda: model_lib.load(path, name=_MODEL_NAME.value), options
    )
    try:
        server.start()
    except model_lib.LoadError as e:
        raise cli.CommandError(str(e)) from None
    except ValueError as e:
        raise cli.BadUsage(str(e)) from None
    except OSError as e:
        raise cli.CommandError(str(e)) from None
    print(f"{supervisor.READY_LINE} {server.target}", flush=True)
    if server.rest_target:
        print(f"{supervisor.REST_LINE} {server.rest_target}", flush=True)
    _serve_until_signal(server.stop)


def _replica_options(replica_lib):
    return replica_lib.ReplicaOptions(
        host=_HOST.value,
        port=_PORT.value,
        rest_port=_rest_port(),
        model_name=_MODEL_NAME.value,
        name=_NAME.value,
        batching=batching_options(),
        auth_token=_read_token(),
        tls_cert_file=_TLS_CERT_FILE.value,
        tls_key_file=_TLS_KEY_FILE.value,
        slowdown=_SLOWDOWN.value,
    )


def serve() -> None:
    """A router over local replica processes or remote replicas."""
    remote = _REPLICA_ADDRESSES.value
    if remote and _MODEL.value:
        raise cli.BadUsage("pass --model (local replicas) or --replica_addresses, not both")
    if not remote:
        _check_model_flag()
    try:
        options = proxy.RouterOptions(
            host=_HOST.value,
            port=_PORT.value,
            rest_port=_rest_port(),
            policy=_POLICY.value,
            outlier=replicas.OutlierOptions(latency_factor=_OUTLIER_LATENCY_FACTOR.value),
            retries=_RETRIES.value,
            watch_interval_s=_WATCH_INTERVAL_S.value,
            auth_token=_read_token(),
            tls_cert_file=_TLS_CERT_FILE.value,
            tls_key_file=_TLS_KEY_FILE.value,
            replica_tls_root_cert_file=_TLS_ROOT_CERT_FILE.value,
        )
        batching_options()  # a bad batching flag fails here, not in N replicas
        router = proxy.RouterServer(options).start()
    except ValueError as e:
        raise cli.BadUsage(str(e)) from None
    except OSError as e:
        raise cli.CommandError(str(e)) from None
    processes = None
    try:
        if remote:
            for address in remote:
                _add_remote(router, address)
        else:
            processes = supervisor.ReplicaProcesses(
                _replica_args(),
                _REPLICAS.value,
                on_ready=router.add_replica,
                on_exit=router.mark_down,
            )
            processes.start()
    except (supervisor.ReplicaStartError, cli.CommandError) as e:
        router.stop()
        raise cli.CommandError(str(e)) from None
    print(f"{_PROG} listening on {router.target}", flush=True)
    if router.rest_target:
        print(f"{_PROG} rest on {router.rest_target}", flush=True)

    def stop() -> None:
        router.stop()
        if processes is not None:
            processes.stop()

    _serve_until_signal(stop)


def _replica_args() -> list[str]:
    """The flags every local replica gets (the router's, for the ones replicas take)."""
    args = [f"--model={os.path.abspath(_MODEL.value)}", f"--model_name={_MODEL_NAME.value}"]
    for name in _BATCH_FLAGS:
        value = flags.FLAGS[name].value
        if isinstance(value, bool):
            args.append(f"--{'' if value else 'no'}{name}")
        elif isinstance(value, list):
            args.append(f"--{name}={','.join(value)}")
        else:
            args.append(f"--{name}={value}")
    if _AUTH_TOKEN_FILE.value:
        args.append(f"--auth_token_file={os.path.abspath(_AUTH_TOKEN_FILE.value)}")
    return args


def _add_remote(router: proxy.RouterServer, address: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            router.add_replica(address, address)
            return
        except grpc.RpcError as e:
            if time.monotonic() > deadline:
                raise cli.CommandError(
                    f"cannot reach the replica at {address}: {e.code().name}: {e.details()}"
                ) from None
            time.sleep(0.5)


def reload() -> None:
    """Asks the router (or replica) at --address to roll the newest model over."""
    print(json.dumps(_admin("Reload", timeout_s=900.0), indent=2))


def status() -> None:
    """Prints the routing state of a router (or a replica's model)."""
    print(json.dumps(_admin("Status", timeout_s=10.0), indent=2))


def _admin(method: str, timeout_s: float) -> dict:
    address = _ADDRESS.value
    if not address:
        raise cli.BadUsage(f"{method.lower()} needs --address=HOST:PORT")
    root = _TLS_ROOT_CERT_FILE.value
    try:
        if root:
            with open(root, "rb") as f:
                channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
        else:
            channel = grpc.insecure_channel(address)
    except OSError as e:
        raise cli.CommandError(f"cannot read --tls_root_cert_file: {e.strerror}") from None
    try:
        return admin.call(
            channel, method, timeout_s=timeout_s, metadata=auth.call_metadata(_read_token())
        )
    except grpc.RpcError as e:
        raise cli.CommandError(
            f"the server at {address} answered {e.code().name}: {' '.join((e.details() or '').split())}"
        ) from None
    finally:
        channel.close()


def _serve_until_signal(stop) -> None:
    done = threading.Event()

    def handle(*_):
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
    logging.info("Stopping")
    stop()


def _read_token() -> Optional[str]:
    try:
        return auth.read_token_file(_AUTH_TOKEN_FILE.value)
    except OSError as e:
        raise cli.CommandError(f"cannot read --auth_token_file: {e.strerror}") from None
    except ValueError as e:
        raise cli.BadUsage(str(e)) from None


def _exit(message: str, code: int) -> NoReturn:
    cli.fail(_PROG, message, code)


def run_main() -> None:
    """Console-script entry point."""
    commands = {
        "serve": _SERVE_USAGE,
        "replica": _REPLICA_USAGE,
        "reload": _RELOAD_USAGE,
        "status": _STATUS_USAGE,
    }
    cli.run(main, cli.Usage(__doc__), commands=commands, flags_parser=cli.one_line_flags(_PROG))


if __name__ == "__main__":
    run_main()
