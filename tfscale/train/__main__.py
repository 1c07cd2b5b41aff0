"""`python -m tfscale.train`: the same as `tfscale-train`."""

from tfscale.train.main import run_main

run_main()
