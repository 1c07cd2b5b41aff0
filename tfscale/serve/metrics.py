"""Prometheus metrics of a serving process, in the text exposition format 0.0.4.

A `Registry` holds metric families (counters, gauges, histograms), each with
fixed label names; `labels(...)` picks the child of one set of label values,
made on first use, and a family without labels is used directly. `render`
writes the whole registry as exposition text (to be served with
`CONTENT_TYPE`); `parse` reads such text back into samples, so that tests and
a router adding up its replicas' metrics need no third-party client. Updates
and `render` are thread-safe.

Example:

```python
registry = Registry()
requests = registry.counter("requests_total", "Requests handled.", labels=("code",))
latency = registry.histogram("request_seconds", "Request latency in seconds.")
requests.labels(code="OK").inc()
latency.observe(0.02)
text = registry.render()  # "# HELP requests_total Requests handled.\\n..."
parse(text)[("requests_total", (("code", "OK"),))]  # 1.0
quantile(latency.snapshot(), 0.5)  # 0.0175: half way into the (0.01, 0.025] bucket
```
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import itertools
import math
import re
import threading
from typing import Callable
from typing import Optional
from typing import Self
from typing import Sequence
from typing import TypeVar

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CONTENT_TYPE",
    "DEFAULT_LATENCY_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "HistogramSnapshot",
    "LabelPairs",
    "Registry",
    "SampleKey",
    "parse",
    "quantile",
]

# (label name, label value) pairs of one sample; sorted by name in `parse`'s keys.
LabelPairs = tuple[tuple[str, str], ...]
# One sample of the text: its name (with any _bucket/_sum/_count suffix) and labels.
SampleKey = tuple[str, LabelPairs]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upper bounds in seconds, from half a millisecond to ten seconds.
# fmt: off
DEFAULT_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# fmt: on
# Rows of a batch: the powers of two from 1 to 1024.
BATCH_SIZE_BUCKETS = tuple(2**i for i in range(11))

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# name, {labels} (greedy: a value never holds "}", a label value may), value, timestamp.
_SAMPLE_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?")
_PAIR_RE = re.compile(
    r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(?:,|$)'
)
_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels_text(pairs: LabelPairs) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


@dataclasses.dataclass(frozen=True)
class HistogramSnapshot:
    """The state of one histogram at one moment.

    Attributes:
      buckets: Increasing finite upper bounds; a last bucket, +Inf, follows them.
      counts: Observations per bucket, not cumulative: `counts[i]` fell in
        `(buckets[i - 1], buckets[i]]`, and `counts[-1]` above `buckets[-1]`
        (one more entry than `buckets`).
      sum: Sum of the observed values.
      count: Number of observations.
    """

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    def cumulative_counts(self) -> tuple[int, ...]:
        """Observations <= each bound, as the `_bucket` samples say; the last is +Inf's."""
        return tuple(itertools.accumulate(self.counts))


class _Metric:
    """A metric family: a name, its help and label names.

    A family without labels holds its one value itself. A family with labels
    holds none: `labels(...)` picks the child of one set of label values, an
    object of the family's class made on first use, which holds it.
    """

    _kind = ""
    _reserved: tuple[str, ...] = ()

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"metric names must match {_NAME_RE.pattern}. Received: name={name!r}")
        if not isinstance(help, str):
            raise ValueError(f"help must be a str. Received: help={help!r}")
        labels = (labels,) if isinstance(labels, str) else tuple(labels)
        for label in labels:
            if not isinstance(label, str) or not _LABEL_RE.fullmatch(label):
                raise ValueError(
                    f"label names must match {_LABEL_RE.pattern}. Received: labels={labels!r}"
                )
            if label.startswith("__") or label in self._reserved:
                raise ValueError(
                    f"label {label!r} is reserved in a {self._kind}. Received: labels={labels!r}"
                )
        if len(set(labels)) != len(labels):
            raise ValueError(f"label names must be unique. Received: labels={labels!r}")
        self._name = name
        self._help = help
        self._label_names = labels
        self._lock = threading.Lock()
        # None: this object holds a value (a family without labels, or a child).
        self._children: Optional[dict[tuple[str, ...], Self]] = {} if labels else None
        self._reset()

    @property
    def name(self) -> str:
        return self._name

    @property
    def label_names(self) -> tuple[str, ...]:
        return self._label_names

    def labels(self, *values: object, **named: object) -> Self:
        """The child of these label values (each made a str), given by position or by name.

        Raises:
          ValueError: The values do not name exactly the family's labels.
        """
        expected = f"{self._kind} {self._name!r} expects labels {self._label_names!r}"
        if self._children is None:
            raise ValueError(
                f"{self._kind} {self._name!r} has no labels to pick a child by. "
                f"Received: values={values!r}, labels={tuple(named)!r}"
            )
        if values and named:
            raise ValueError(
                f"{expected}, by position or by name, not both. "
                f"Received: values={values!r}, labels={tuple(named)!r}"
            )
        if named:
            if set(named) != set(self._label_names):
                raise ValueError(f"{expected}. Received: labels={tuple(named)!r}")
            values = tuple(named[label] for label in self._label_names)
        elif len(values) != len(self._label_names):
            raise ValueError(f"{expected}. Received: {len(values)} values {values!r}")
        key = tuple(str(value) for value in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = copy.copy(self)
                child._lock = threading.Lock()
                child._children = None
                child._reset()
        return child

    def _check_holds_value(self) -> None:
        if self._children is not None:
            raise ValueError(
                f"{self._kind} {self._name!r} has labels {self._label_names!r}: pick a child "
                "with .labels(...) first"
            )

    def _reset(self) -> None:
        raise NotImplementedError

    def _render_value(self, lines: list[str], pairs: LabelPairs) -> None:
        raise NotImplementedError

    def _sample_names(self) -> tuple[str, ...]:
        """Names this family's lines use, which no other family may use."""
        return (self._name,)

    def _render(self, lines: list[str]) -> None:
        help_text = self._help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {self._name} {help_text}")
        lines.append(f"# TYPE {self._name} {self._kind}")
        if self._children is None:
            self._render_value(lines, ())
            return
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            child._render_value(lines, tuple(zip(self._label_names, values)))


class _Scalar(_Metric):
    """A metric of one number per child."""

    @property
    def value(self) -> float:
        raise NotImplementedError

    def _render_value(self, lines: list[str], pairs: LabelPairs) -> None:
        lines.append(f"{self._name}{_labels_text(pairs)} {_format_value(self.value)}")


class Counter(_Scalar):
    """A total that only goes up (made by `Registry.counter`)."""

    _kind = "counter"

    def _reset(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Adds `amount` (>= 0)."""
        self._check_holds_value()
        if not amount >= 0:
            raise ValueError(f"counter {self._name!r} only goes up. Received: amount={amount!r}")
        with self._lock:
            self._value += float(amount)

    @property
    def value(self) -> float:
        self._check_holds_value()
        with self._lock:
            return self._value


class Gauge(_Scalar):
    """A value that goes up and down, or is read from a function (made by `Registry.gauge`)."""

    _kind = "gauge"

    def _reset(self) -> None:
        self._value = 0.0
        self._fn: Optional[Callable[[], float]] = None

    def set(self, value: float) -> None:
        """Sets the value (and stops reading it from a `set_function` function)."""
        self._check_holds_value()
        with self._lock:
            self._value = float(value)
            self._fn = None

    def inc(self, amount: float = 1.0) -> None:
        """Adds `amount`."""
        self._check_holds_value()
        with self._lock:
            if self._fn is not None:
                raise ValueError(
                    f"gauge {self._name!r} reads its value from a function: inc() and dec() "
                    f"need a value set by set(). Received: amount={amount!r}"
                )
            self._value += float(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtracts `amount`."""
        self.inc(-amount)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Makes the value `fn()`, called at each read (each `render` among them)."""
        self._check_holds_value()
        if not callable(fn):
            raise TypeError(f"fn must be callable. Received: fn={fn!r}")
        with self._lock:
            self._fn = fn

    @property
    def value(self) -> float:
        self._check_holds_value()
        with self._lock:
            fn, value = self._fn, self._value
        return value if fn is None else float(fn())


class Histogram(_Metric):
    """Observations counted in buckets of upper bounds (made by `Registry.histogram`)."""

    _kind = "histogram"
    _reserved = ("le",)

    def __init__(self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]):
        try:
            bounds = tuple(float(b) for b in buckets)
        except (TypeError, ValueError):
            bounds = ()
        if bounds and bounds[-1] == math.inf:
            bounds = bounds[:-1]  # +Inf is always the last bucket
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(
                f"buckets must be a non-empty sequence of finite numbers. "
                f"Received: buckets={buckets!r}"
            )
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"buckets must be increasing. Received: buckets={tuple(buckets)!r}")
        self._buckets = bounds
        super().__init__(name, help, labels)

    def _reset(self) -> None:
        self._counts = [0] * (len(self._buckets) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        """Counts `value` in the first bucket whose upper bound is >= it."""
        self._check_holds_value()
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"histogram {self._name!r} cannot observe NaN. Received: value=nan")
        index = bisect.bisect_left(self._buckets, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> HistogramSnapshot:
        self._check_holds_value()
        with self._lock:
            return HistogramSnapshot(self._buckets, tuple(self._counts), self._sum, self._count)

    def _sample_names(self) -> tuple[str, ...]:
        return tuple(self._name + suffix for suffix in ("", "_bucket", "_sum", "_count"))

    def _render_value(self, lines: list[str], pairs: LabelPairs) -> None:
        snapshot = self.snapshot()
        bounds = snapshot.buckets + (math.inf,)
        for bound, total in zip(bounds, snapshot.cumulative_counts()):
            bucket_labels = _labels_text(pairs + (("le", _format_value(bound)),))
            lines.append(f"{self._name}_bucket{bucket_labels} {total}")
        lines.append(f"{self._name}_sum{_labels_text(pairs)} {_format_value(snapshot.sum)}")
        lines.append(f"{self._name}_count{_labels_text(pairs)} {snapshot.count}")


_M = TypeVar("_M", Counter, Gauge, Histogram)


class Registry:
    """The metric families of one process, rendered together.

    Example:

    ```python
    registry = Registry()
    queue_depth = registry.gauge("queue_depth", "Requests waiting.")
    queue_depth.set_function(lambda: batcher.stats().queue_depth)
    body, content_type = registry.render().encode(), CONTENT_TYPE
    ```
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._families: list[_Metric] = []
        self._owners: dict[str, str] = {}  # name a family's lines use -> that family's name

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """Registers and returns a counter family."""
        return self._register(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """Registers and returns a gauge family."""
        return self._register(Gauge(name, help, labels))

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> Histogram:
        """Registers and returns a histogram family with these bucket upper bounds."""
        return self._register(Histogram(name, help, labels, buckets))

    def _register(self, family: _M) -> _M:
        with self._lock:
            for sample in family._sample_names():
                owner = self._owners.get(sample)
                if owner == family.name:
                    raise ValueError(f"metric {family.name!r} is already registered")
                if owner is not None:
                    raise ValueError(
                        f"metric {family.name!r} clashes with metric {owner!r}: "
                        f"both would write {sample!r}"
                    )
            self._owners.update((sample, family.name) for sample in family._sample_names())
            self._families.append(family)
        return family

    def render(self) -> str:
        """The exposition text of every family, in registration order."""
        with self._lock:
            families = list(self._families)
        lines: list[str] = []
        for family in families:
            family._render(lines)
        return "".join(line + "\n" for line in lines)


def quantile(snapshot: HistogramSnapshot, q: float) -> float:
    """Estimates the `q`-quantile of a histogram's observations, as PromQL's `histogram_quantile`.

    The value is interpolated linearly within the bucket holding the rank
    `q * count`; the first bucket starts at 0 (or is its bound if that is
    <= 0), and a rank in the +Inf bucket gives the last finite bound.

    Returns:
      The estimate, or NaN for a histogram without observations.

    Raises:
      ValueError: `q` is not in [0, 1].
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1]. Received: q={q!r}")
    if snapshot.count == 0:
        return math.nan
    rank = q * snapshot.count
    below = 0
    for i, (bound, n) in enumerate(zip(snapshot.buckets, snapshot.counts)):
        if n and below + n >= rank:
            if i == 0 and bound <= 0:
                return bound
            lower = snapshot.buckets[i - 1] if i else 0.0
            return lower + (bound - lower) * (rank - below) / n
        below += n
    return snapshot.buckets[-1]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda match: _UNESCAPES[match.group(1)], value)


def parse(text: str) -> dict[SampleKey, float]:
    """The samples of exposition text: {(sample name, label pairs sorted by name): value}.

    Comments (`# HELP`, `# TYPE`) and blank lines are skipped, timestamps ignored.

    Example:

    ```python
    parse('rows_total{replica="a"} 3\\n')  # {("rows_total", (("replica", "a"),)): 3.0}
    ```

    Raises:
      ValueError: A line is not a sample, or a sample appears twice.
    """
    samples: dict[SampleKey, float] = {}
    # Not splitlines(): label values may hold "\r" or other line breaks unescaped.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.fullmatch(line)
        error = f"line {number} must be a sample 'name{{label=\"value\",...}} value'"
        if match is None:
            raise ValueError(f"{error}. Received: {line!r}")
        name, labels, value = match.groups()
        pairs, position = [], 0
        while labels and position < len(labels):
            pair = _PAIR_RE.match(labels, position)
            if pair is None:
                raise ValueError(f"{error}. Received: {line!r}")
            try:
                pairs.append((pair.group(1), _unescape(pair.group(2))))
            except KeyError:
                raise ValueError(f'{error} (escapes: \\\\, \\", \\n). Received: {line!r}') from None
            position = pair.end()
        if len({label for label, _ in pairs}) != len(pairs):
            raise ValueError(f"{error}, each label once. Received: {line!r}")
        try:
            number_value = float(value)
        except ValueError:
            raise ValueError(f"{error}, the value a float. Received: {line!r}") from None
        key = (name, tuple(sorted(pairs)))
        if key in samples:
            raise ValueError(f"line {number} repeats sample {key!r}. Received: {line!r}")
        samples[key] = number_value
    return samples
