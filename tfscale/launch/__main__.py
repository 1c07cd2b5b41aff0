"""`python -m tfscale.launch`: the same as `tfscale-launch`."""

from tfscale.launch.main import run_main

run_main()
