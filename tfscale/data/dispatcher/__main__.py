"""`python -m tfscale.data.dispatcher`: the same as `tfscale-dispatcher`."""

from tfscale.data.dispatcher.main import run_main

run_main()
