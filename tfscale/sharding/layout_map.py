"""Which mesh axis each dimension of each variable is split over.

A `LayoutMap` is an ordered list of rules: a regular expression searched in
a Keras variable path (`"block0_mlp_up/kernel"`) and, per dimension of the
variable, a mesh axis name or `None` (not split). The first matching rule
wins; a variable no rule matches is replicated on every device.

Example:

```python
layout_map = tfscale.LayoutMap({
    r"mlp_up/kernel$": (None, "model"),    # column-parallel
    r"mlp_up/bias$": ("model",),
    r"mlp_down/kernel$": ("model", None),  # row-parallel
})
layout_map.axes_for("block0_mlp_up/kernel", (64, 128))   # (None, "model")
layout_map = tfscale.LayoutMap.preset("megatron")
```
"""

from __future__ import annotations

import re
from typing import Any
from typing import Iterable
from typing import Mapping
from typing import Optional
from typing import Sequence
from typing import Union

__all__ = [
    "Axes",
    "LayoutMap",
    "LayoutMapLike",
    "PRESETS",
]

# One entry per dimension: a mesh axis name, or None for "not split".
Axes = tuple[Optional[str], ...]
LayoutMapLike = Union["LayoutMap", str, Mapping[str, Sequence[Optional[str]]], Any, None]

PRESETS = ("data_parallel", "megatron")
_EMBEDDING_AXES = ("hidden", "vocab")


class LayoutMap:
    """Ordered regex rules from variable paths to per-dimension mesh axes.

    Args:
      rules: `{pattern: axes}` (insertion order is rule order), a sequence of
        `(pattern, axes)` pairs, or a `keras.distribution.LayoutMap` (its
        keys must match a whole path, as in Keras). Each `axes` is a tuple
        with one mesh axis name or `None` per dimension of the variable.

    Raises:
      ValueError: for a pattern that is not a valid regular expression or
        axes that are not a tuple of names and `None`s.

    Example:

    ```python
    LayoutMap([(r"dense/kernel", (None, "model"))])
    ```
    """

    def __init__(
        self,
        rules: Union[
            Mapping[str, Sequence[Optional[str]]],
            Iterable[tuple[str, Sequence[Optional[str]]]],
            Any,
            None,
        ] = None,
    ):
        self._rules: list[tuple[re.Pattern[str], Axes]] = []
        for pattern, axes in _rule_items(rules):
            self._add(pattern, axes)

    @classmethod
    def preset(
        cls, name: str, *, model_axis: str = "model", embedding: str = "hidden"
    ) -> "LayoutMap":
        """A named layout for common models.

        Args:
          name: `"data_parallel"` (every variable replicated) or `"megatron"`:
            MLP Dense pairs split column- then row-parallel (first layer named
            `*up`, `*fc1`, `*wi` or `*intermediate`; second `*down`, `*fc2` or
            `*wo`), MultiHeadAttention split by heads, and embedding tables
            (`*/embeddings`, and Dense input projections named `embed*`)
            split on the hidden or vocabulary axis.
          model_axis: the mesh axis the model is split over.
          embedding: `"hidden"` or `"vocab"`: which embedding axis is split.

        Raises:
          ValueError: for an unknown preset or embedding axis.
        """
        if name == "data_parallel":
            return cls()
        if name != "megatron":
            raise ValueError(f"Unknown layout preset {name!r}. Valid presets: {', '.join(PRESETS)}")
        if embedding not in _EMBEDDING_AXES:
            raise ValueError(
                f"embedding must be one of {_EMBEDDING_AXES}. Received: embedding={embedding!r}"
            )
        m = model_axis
        table = (None, m) if embedding == "hidden" else (m, None)
        return cls(
            [
                # Attention: each device holds whole heads, so the score
                # computation needs no communication; the output projection
                # sums the heads' partial results (one all-reduce).
                (r"(^|/)(query|key|value)/kernel$", (None, m, None)),
                (r"(^|/)(query|key|value)/bias$", (m, None)),
                (r"(^|/)attention_output/kernel$", (m, None, None)),
                # MLP: column-parallel up, row-parallel down; the hidden
                # activations stay split between them.
                (r"(^|[/_])(up|fc1|wi|intermediate)/kernel$", (None, m)),
                (r"(^|[/_])(up|fc1|wi|intermediate)/bias$", (m,)),
                (r"(^|[/_])(down|fc2|wo)/kernel$", (m, None)),
                (r"(^|/)[^/]*/embeddings$", table),
                (r"(^|/)embed[^/]*/kernel$", table),
                (r"(^|/)embed[^/]*/bias$", (m,) if embedding == "hidden" else (None,)),
            ]
        )

    @classmethod
    def from_value(cls, value: LayoutMapLike) -> "LayoutMap":
        """A LayoutMap from a LayoutMap, a preset name, rules, or None (replicate all)."""
        if isinstance(value, LayoutMap):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        return cls(value)

    @property
    def rules(self) -> tuple[tuple[str, Axes], ...]:
        """The `(pattern, axes)` rules in match order."""
        return tuple((p.pattern, axes) for p, axes in self._rules)

    @property
    def mesh_axes(self) -> frozenset[str]:
        """Every mesh axis a rule names."""
        return frozenset(a for _, axes in self._rules for a in axes if a is not None)

    def axes_for(self, path: str, shape: Sequence[int]) -> Optional[Axes]:
        """The axes of the first rule matching `path`; `None` (replicate) if none does.

        Raises:
          ValueError: if the matching rule's rank is not the variable's,
            naming the variable, the rule and both shapes.
        """
        shape = tuple(int(d) for d in shape)
        for pattern, axes in self._rules:
            if pattern.search(path):
                if len(axes) != len(shape):
                    raise ValueError(
                        f"Layout rule {pattern.pattern!r} gives {len(axes)} dimension(s) "
                        f"{axes} but variable {path!r} has shape {shape} (rank {len(shape)})."
                    )
                return axes
        return None

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        rules = ", ".join(f"{p!r}: {axes}" for p, axes in self.rules)
        return f"LayoutMap({{{rules}}})"

    def _add(self, pattern: str, axes: Any) -> None:
        if not isinstance(pattern, str):
            raise ValueError(f"Layout rule patterns are strings. Received: {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"Layout rule {pattern!r} is not a valid regular expression: {e}"
            ) from None
        if (
            isinstance(axes, str)
            or not isinstance(axes, Sequence)
            or not all(a is None or isinstance(a, str) for a in axes)
        ):
            raise ValueError(
                f"Layout rule {pattern!r}: axes must be a tuple with a mesh axis name or None "
                f"per dimension. Received: {axes!r}"
            )
        self._rules.append((compiled, tuple(axes)))


def _rule_items(rules: Any) -> list[tuple[str, Any]]:
    if rules is None:
        return []
    if _is_keras_layout_map(rules):
        # Keras matches a whole path (exact key first, then re.fullmatch).
        return [(rf"^(?:{key})$", tuple(rules[key].axes)) for key in rules]
    if isinstance(rules, Mapping):
        return list(rules.items())
    if isinstance(rules, (list, tuple)):
        items = list(rules)
        if not all(isinstance(item, (list, tuple)) and len(item) == 2 for item in items):
            raise ValueError(
                f"Layout rules as a sequence are (pattern, axes) pairs. Received: {rules!r}"
            )
        return [tuple(item) for item in items]
    raise ValueError(
        "A layout map is a tfscale.LayoutMap, a preset name "
        f"({', '.join(PRESETS)}), a dict or list of (pattern, axes) rules, or a "
        f"keras.distribution.LayoutMap. Received: {type(rules).__name__}"
    )


def _is_keras_layout_map(value: Any) -> bool:
    # Imported lazily: keras.distribution is only needed when one is passed.
    from keras import distribution  # pylint: disable=import-outside-toplevel

    return isinstance(value, distribution.LayoutMap)
