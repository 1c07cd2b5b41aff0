"""`python -m tfscale.serve`: the same as `tfscale-serve`."""

from tfscale.serve.main import run_main

run_main()
