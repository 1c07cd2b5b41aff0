"""Training speed through the dispatcher: `tfscale-train` with and without it.

Each round runs `tfscale-train --config=configs/default.py` twice, in a
fresh workdir each, alternating which goes first:

- `direct`: the train split read by tf.data directly (the default);
- `dispatched`: the same run with `--config.data.dispatcher.embedded=True`
  (an in-process dispatcher journaling to the workdir; the shards leased,
  read by `DispatchedInput` in tf.data, completions tracked by training's
  reported consumption).

The figure of a run is the `examples_per_sec` of its last epoch in
`metrics.json` (the `Throughput` callback's: steps x global batch over the
epoch's wall time, after the first epoch's tracing). Reported: each path's
median over rounds, and the median over rounds of dispatched / direct
within the round.

  .venv/bin/python tools/bench/dispatched_training.py --out=/tmp/tfscale_bench/dispatched_training \\
      --rounds=5 --epochs=2

A smoke run (about a minute): `--rounds=1 --epochs=2 --max_train_examples=4096`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/tfscale_bench/dispatched_training", "Output directory.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds (medians are reported).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs per run (the last one is measured).")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_train_examples", None, "Limit the train split (None: all 60000)."
)
_PATHS = ("direct", "dispatched")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(path: str, cache_dir: str) -> float:
    """One `tfscale-train` run; its last epoch's examples/s."""
    with tempfile.TemporaryDirectory(prefix=f"tfscale-{path}-") as workdir:
        argv = [
            sys.executable,
            "-m",
            "tfscale.train",
            "--config=configs/default.py",
            f"--workdir={workdir}",
            f"--config.training.epochs={_EPOCHS.value}",
            f"--config.data.cache_dir={cache_dir}",
        ]
        if _MAX_EXAMPLES.value:
            argv.append(f"--config.data.max_train_examples={_MAX_EXAMPLES.value}")
        if path == "dispatched":
            argv.append("--config.data.dispatcher.embedded=True")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        result = subprocess.run(argv, cwd=_REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{path} run failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(workdir, "metrics.json")) as f:
            return float(json.load(f)["throughput"]["examples_per_sec"])


def _plot(summary: dict, path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = [summary[p]["median"] for p in _PATHS]
    ax.bar(_PATHS, values, color=["tab:gray", "tab:blue"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("examples/s (last epoch, median)")
    ax.set_title(f"tfscale-train, dispatched / direct = {summary['ratio']['median']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    cache_dir = os.path.join(_OUT.value, "cache")
    rounds = []
    for r in range(_ROUNDS.value):
        order = _PATHS if r % 2 == 0 else _PATHS[::-1]
        figures = {path: _run(path, cache_dir) for path in order}
        figures["ratio"] = figures["dispatched"] / figures["direct"]
        rounds.append(figures)
        print(
            f"round {r}: direct {figures['direct']:,.0f}  dispatched {figures['dispatched']:,.0f}"
            f"  ratio {figures['ratio']:.3f}",
            flush=True,
        )
    summary = {
        key: {
            "median": statistics.median(f[key] for f in rounds),
            "min": min(f[key] for f in rounds),
            "max": max(f[key] for f in rounds),
        }
        for key in (*_PATHS, "ratio")
    }
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(
            {
                "rounds": rounds,
                "summary": summary,
                "settings": {
                    "epochs": _EPOCHS.value,
                    "rounds": _ROUNDS.value,
                    "max_train_examples": _MAX_EXAMPLES.value,
                },
            },
            f,
            indent=1,
        )
    _plot(summary, os.path.join(_OUT.value, "dispatched_training.png"))
    print(
        f"dispatched / direct examples/s: {summary['ratio']['median']:.3f} "
        f"(min {summary['ratio']['min']:.3f}, max {summary['ratio']['max']:.3f})"
    )
    print(f"wrote {_OUT.value}/results.json and dispatched_training.png")


if __name__ == "__main__":
    app.run(main)
