"""The `"tpu"` kind: `TPUStrategy` over a Cloud TPU, found fast or not at all.

`tfscale.distribution("tpu", tpu=...)` resolves the TPU with
`TPUClusterResolver` (`"local"`: the TPU of this host; a Cloud TPU name,
looked up through the GCE metadata server and the Cloud TPU API; or a
worker's `"grpc://host:port"`), connects to it, initializes the TPU system
and builds a `TPUStrategy`, behind the same facade as the other kinds.

Without a TPU, TensorFlow's own path can wait for minutes (a gRPC address
that nothing answers) or fail with a kernel registration error. This
module first probes for what the `tpu` option names, within
`PROBE_TIMEOUT_S`, and fails with one line that says what it looked for
(`TPUUnavailableError`).

The strategy has the Keras path fixes of `keras_paths` (`KerasPathsMixin`),
which are about Keras's calls into any strategy, not about the devices:
`class_weight` over a distributed dataset, a Python generator's peeked
batch, and unsynchronized BatchNormalization's moving statistics averaged
over replicas on write (a `MEAN` aggregation, which `TPUStrategy`
supports). The collective-key fix finds no collective launchers on TPU (XLA
all-reduces) and changes nothing; the copy of each batch into memory
TensorFlow owns costs one host memcpy per batch.

One client process drives every host of a TPU slice (TF2's `TPUStrategy`
is single-client): that process is the chief, and `num_workers` counts the
TPU hosts, whose input pipelines each read a share of the global batch.
When the program is started on every host of a slice anyway, only host 0
(`TPU_WORKER_ID`, as GKE sets it, else the resolver's `task_id`) is the
chief, so the others write no checkpoints.

Example:

```python
dist = tfscale.distribution("tpu", tpu="local")
with dist.scope():
    model = make_model()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=32)
model.fit(dist.distribute_dataset(unbatched_ds, global_batch_size=1024), epochs=2)
```
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import socket
import threading
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Optional
from typing import Union

import tensorflow as tf

from tfscale.strategies import distribution as strategy_distribution
from tfscale.strategies import keras_paths

__all__ = [
    "PROBE_TIMEOUT_S",
    "TPUDistribution",
    "TPURuntime",
    "TPUUnavailableError",
    "Target",
    "build",
    "parse_target",
    "probe",
    "tpu_distribution",
]

Resolver = tf.distribute.cluster_resolver.ClusterResolver
Environ = Mapping[str, str]

# The whole probe of one `tpu` value (a name resolution plus a TCP connect).
PROBE_TIMEOUT_S = 1.0

# Cloud TPU node names are GCE resource names (RFC 1035 labels).
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_METADATA_HOST_VARS = ("GCE_METADATA_HOST", "GCE_METADATA_IP")
_TPU_API = ("tpu.googleapis.com", 443)
_FORMS = "'auto', 'local', a Cloud TPU name or 'grpc://host:port'"
_AUTO_NAME = "tpu='auto' with $TPU_NAME"
_AUTO_LOCAL = "tpu='auto' with $TPU_NAME unset"


class TPUUnavailableError(ValueError):
    """The `tpu` option names no TPU this process can use.

    A `ValueError`, as for any option value that cannot work here, so
    `tfscale-train` reports it in one line.
    """


@dataclasses.dataclass(frozen=True)
class Target:
    """What a `tpu` option value names.

    Attributes:
      tpu: the value `TPUClusterResolver` gets: `"local"`, a name, or
        `"grpc://host:port"`.
      form: `"local"`, `"name"` or `"address"`.
      zone: the Cloud zone of a named TPU (else the metadata server's).
      project: the Cloud project of a named TPU (else the metadata server's).
      source: how `"auto"` was resolved (`"tpu='auto' with $TPU_NAME"`), or `""`.
    """

    tpu: str
    form: str
    zone: Optional[str] = None
    project: Optional[str] = None
    source: str = ""

    @property
    def address(self) -> tuple[str, int]:
        """An address target's `(host, port)`."""
        host, port = self.tpu[len("grpc://") :].rsplit(":", 1)
        return host.strip("[]"), int(port)

    def describe(self) -> str:
        """E.g. `tpu='local', from tpu='auto' with $TPU_NAME unset`."""
        return f"tpu={self.tpu!r}" + (f", from {self.source}" if self.source else "")


def parse_target(
    tpu: str,
    zone: Optional[str] = None,
    project: Optional[str] = None,
    environ: Optional[Environ] = None,
) -> Target:
    """Checks a `tpu` option and says what it names.

    Args:
      tpu: `"auto"` (`$TPU_NAME` when set, else `"local"`), `"local"`, a
        Cloud TPU name, or `"grpc://host:port"`.
      zone: the zone of a named TPU.
      project: the project of a named TPU.
      environ: the environment `"auto"` reads (`os.environ` when None).

    Raises:
      ValueError: for any other value, or a zone or project without a name.
    """
    if not isinstance(tpu, str) or not tpu.strip():
        raise ValueError(f"tpu must be {_FORMS}. Received: tpu={tpu!r}")
    for option, value in (("zone", zone), ("project", project)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{option} must be a non-empty string. Received: {option}={value!r}")
    source = ""
    if tpu == "auto":
        name = (os.environ if environ is None else environ).get("TPU_NAME", "").strip()
        tpu, source = (name, _AUTO_NAME) if name else ("local", _AUTO_LOCAL)
    try:
        form = _form(tpu)
    except ValueError as e:
        raise ValueError(f"{e} (from {source})" if source else str(e)) from None
    if form != "name" and (zone is not None or project is not None):
        raise ValueError(
            "zone and project go with a Cloud TPU name, which they locate. "
            f"Received: tpu={tpu!r}, zone={zone!r}, project={project!r}"
        )
    return Target(tpu, form, zone, project, source)


def _form(tpu: str) -> str:
    if tpu == "local":
        return "local"
    if tpu.startswith("grpc://"):
        match = re.fullmatch(r"grpc://([^\s/:\[\]]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})", tpu)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ValueError(
                "A TPU worker address must be grpc://host:port (port 1-65535). "
                f"Received: tpu={tpu!r}"
            )
        return "address"
    if "://" in tpu:
        raise ValueError(f"A TPU worker address must use grpc://. Received: tpu={tpu!r}")
    if re.fullmatch(r"[^\s/:]+:\d+", tpu):
        raise ValueError(
            f"tpu={tpu!r} looks like a worker address: write tpu='grpc://{tpu}'. "
            f"Valid forms: {_FORMS}"
        )
    if not _NAME.fullmatch(tpu):
        raise ValueError(
            "A Cloud TPU name has 1-63 lowercase letters, digits and hyphens, starting with "
            f"a letter. Received: tpu={tpu!r}; valid forms: {_FORMS}"
        )
    return "name"


def probe(target: Target, timeout_s: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why `target` cannot be a TPU here, found within `timeout_s`; None if it may be.

    Local: a TPU device file (`/dev/accel*`, `/dev/vfio/N`) or a TPU that
    TensorFlow lists. Address: a gRPC (HTTP/2) server answers there. Name:
    the GCE metadata server answers (when the zone or project must come from
    it; else the Cloud TPU API's host accepts a connection), and the Cloud
    TPU API client is installed. None does not promise a TPU: initializing
    it decides.
    """
    if target.form == "local":
        if any(glob.glob(pattern) for pattern in _DEVICE_FILES):
            return None
        if tf.config.list_physical_devices("TPU"):
            return None
        return "no /dev/accel* or /dev/vfio TPU device, and TensorFlow lists no TPU on this host"
    if target.form == "address":
        host, port = target.address
        failure = _no_answer(host, port, timeout_s, _HTTP2_GREETING, _http2_reply, "a gRPC server")
        return failure and f"no gRPC server at {host}:{port}: {failure}"
    if target.zone is None or target.project is None:
        host, port = _metadata_server()
        request = (
            f"GET /computeMetadata/v1/instance/zone HTTP/1.0\r\nHost: {host}\r\n"
            "Metadata-Flavor: Google\r\n\r\n"
        ).encode()
        failure = _no_answer(host, port, timeout_s, request, _metadata_reply, "a metadata server")
        if failure:
            where = host if port == 80 else f"{host}:{port}"
            return (
                f"looking the name up needs the GCE metadata server at {where}: {failure}; "
                "off Google Cloud give zone= and project=, or tpu='grpc://host:port'"
            )
    else:
        failure = _no_answer(*_TPU_API, timeout_s)
        if failure:
            return f"looking the name up needs the Cloud TPU API at {_TPU_API[0]}: {failure}"
    if importlib.util.find_spec("googleapiclient") is None:
        return (
            "looking a name up needs the Cloud TPU API client, which is not installed "
            "(pip install cloud-tpu-client), or give tpu='grpc://host:port'"
        )
    return None


# An HTTP/2 client's opening: the preface and an empty SETTINGS frame.
_HTTP2_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
# A judge of a reply so far: True (expected), False (not), None (read more).
Judge = Callable[[bytes], Optional[bool]]


def _http2_reply(reply: bytes) -> Optional[bool]:
    """A gRPC server's first frame is its SETTINGS (frame type 4, the fourth byte)."""
    return None if len(reply) < 4 else reply[3] == 4


def _metadata_reply(reply: bytes) -> Optional[bool]:
    """The GCE metadata server answers 200 with a `Metadata-Flavor: Google` header."""
    if b"\r\n\r\n" not in reply:
        return None
    head = reply.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    status = head[0].split()
    return len(status) > 1 and status[1] == b"200" and b"metadata-flavor: google" in head


def _metadata_server() -> tuple[str, int]:
    """Where TensorFlow's Cloud TPU client asks: `$GCE_METADATA_HOST` (or `_IP`), host[:port]."""
    for variable in _METADATA_HOST_VARS:
        value = os.environ.get(variable, "").strip()
        if value:
            host, _, port = value.partition(":")
            return host, int(port) if port.isdigit() else 80
    return "metadata.google.internal", 80


def _no_answer(
    host: str,
    port: int,
    timeout_s: float,
    request: bytes = b"",
    judge: Optional[Judge] = None,
    expected: str = "",
) -> Optional[str]:
    """Why host:port does not answer within `timeout_s`; None when it does.

    Without `request`, a TCP connection is the answer; with it, a reply
    that `judge` accepts (`expected` names what should answer, e.g. "a gRPC
    server").
    """
    deadline = time.monotonic() + timeout_s
    addresses = _lookup(host, port, timeout_s)
    if isinstance(addresses, str):
        return addresses
    failure = "no address"
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.connect(address)
                if not request or judge is None:
                    return None
                sock.sendall(request)
                if _read_reply(sock, deadline, judge):
                    return None
                return f"it answers, but not as {expected}"
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except OSError as e:
            failure = e.strerror or str(e) or type(e).__name__
    return failure


def _lookup(host: str, port: int, timeout_s: float) -> Union[list[Any], str]:
    """`getaddrinfo(host, port)`, or why it failed or took over `timeout_s`.

    It runs in a daemon thread: `getaddrinfo` takes no timeout, and without
    a network or a DNS server it may block far longer.
    """
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e.strerror or str(e))

    thread = threading.Thread(target=lookup, name=f"tfscale-tpu-lookup-{host}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return found[0] if found else f"looking up {host!r} took over {timeout_s:g} s"


def _read_reply(sock: socket.socket, deadline: float, judge: Judge) -> bool:
    """Reads until `judge` decides, the peer closes, or the deadline (TimeoutError)."""
    reply = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(4096)
        reply += chunk
        verdict = judge(reply)
        if verdict is not None:
            return verdict
        if not chunk or len(reply) > 65536:
            return False


class _TPUStrategy(keras_paths.KerasPathsMixin, tf.distribute.TPUStrategy):
    """A `TPUStrategy` with the Keras path fixes of `keras_paths`."""

    def __init__(self, resolver: Resolver):
        super().__init__(resolver)
        self._keras_paths_init()


def _resolve(target: Target) -> Resolver:
    failure = probe(target)
    if failure:
        raise TPUUnavailableError(f"no TPU found: looked for {target.describe()} ({failure})")
    return tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=target.tpu, zone=target.zone, project=target.project
    )


@dataclasses.dataclass(frozen=True)
class TPURuntime:
    """The steps from a `tpu` option to a strategy, replaceable in tests.

    Attributes:
      resolve: a `Target` to its cluster resolver; raises
        `TPUUnavailableError` when there is no TPU to resolve.
      connect: connects this process to the resolver's cluster.
      initialize: initializes the TPU system.
      strategy: builds the strategy over the initialized system.
    """

    resolve: Callable[[Target], Resolver] = _resolve
    connect: Callable[[Resolver], Any] = tf.config.experimental_connect_to_cluster
    initialize: Callable[[Resolver], Any] = tf.tpu.experimental.initialize_tpu_system
    strategy: Callable[[Resolver], tf.distribute.Strategy] = _TPUStrategy


class TPUDistribution(strategy_distribution.StrategyDistribution):
    """A `TPUStrategy`'s distribution: one client, the TPU slice's hosts as workers.

    Args:
      strategy: the strategy over the initialized TPU system.
      resolver: the cluster resolver it was built from.
      metadata: the TPU system's `tf.tpu.experimental.TPUSystemMetadata`.
      options: the options the kind was built with.
      environ: where `TPU_WORKER_ID` is read (`os.environ` when None).
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        resolver: Resolver,
        metadata: Any,
        options: Mapping[str, Any],
        environ: Optional[Environ] = None,
    ):
        super().__init__("tpu", strategy, options)
        self._resolver = resolver
        self._metadata = metadata
        self._host = _host_index(resolver, os.environ if environ is None else environ)

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    @property
    def num_cores(self) -> int:
        """TPU cores over all hosts of the slice."""
        return int(self._metadata.num_cores)

    @property
    def num_workers(self) -> int:
        """The TPU hosts: each one's input pipeline reads a share of the batch."""
        return max(1, int(self._metadata.num_hosts))

    @property
    def is_chief(self) -> bool:
        """Whether this is host 0's client (see the module docstring)."""
        return self._host == 0


def _host_index(resolver: Resolver, environ: Environ) -> int:
    """This process's TPU host: `TPU_WORKER_ID` when set, else the resolver's task_id.

    Raises:
      ValueError: for a `TPU_WORKER_ID` that is not a non-negative integer.
    """
    worker_id = environ.get("TPU_WORKER_ID", "").strip()
    if not worker_id:
        return getattr(resolver, "task_id", None) or 0
    if not worker_id.isdigit():
        raise ValueError(f"TPU_WORKER_ID must be a host index. Received: {worker_id!r}")
    return int(worker_id)


def build(
    tpu: str = "auto",
    zone: Optional[str] = None,
    project: Optional[str] = None,
    *,
    runtime: TPURuntime = TPURuntime(),
    environ: Optional[Environ] = None,
) -> TPUDistribution:
    """`tpu_distribution` with its runtime steps and environment given.

    Raises:
      ValueError: for a malformed option.
      TPUUnavailableError: when no TPU answers, or it cannot be initialized.
    """
    options = {
        k: v for k, v in (("tpu", tpu), ("zone", zone), ("project", project)) if v is not None
    }
    target = parse_target(tpu, zone, project, environ)
    resolver = runtime.resolve(target)
    try:
        runtime.connect(resolver)
        runtime.initialize(resolver)
    except (tf.errors.OpError, RuntimeError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise TPUUnavailableError(
            f"TPU {target.describe()} could not be initialized: {type(e).__name__}: {first_line}"
        ) from None
    metadata = resolver.get_tpu_system_metadata()
    if not metadata.num_cores:
        raise TPUUnavailableError(
            f"no TPU found: looked for {target.describe()} (its TPU system has no cores)"
        )
    return TPUDistribution(runtime.strategy(resolver), resolver, metadata, options, environ)


def tpu_distribution(
    tpu: str = "auto", zone: Optional[str] = None, project: Optional[str] = None
) -> TPUDistribution:
    """Synchronous training on a Cloud TPU (one host, or a pod slice from one client).

    Args:
      tpu: `"auto"` (`$TPU_NAME` when set, else `"local"`), `"local"` (the
        TPU of this host), a Cloud TPU name (looked up through the GCE
        metadata server and the Cloud TPU API), or `"grpc://host:port"` (a
        TPU worker's address).
      zone: the zone of a named TPU; the metadata server's when None.
      project: the project of a named TPU; the metadata server's when None.

    Raises:
      ValueError: for a malformed option.
      TPUUnavailableError: when what `tpu` names is not there (within
        `PROBE_TIMEOUT_S`), or cannot be initialized.
    """
    return build(tpu, zone, project)
