"""Training: the `tfscale-train` binary, its library, models and callbacks."""
