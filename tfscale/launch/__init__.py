"""`tfscale-launch`: start and supervise multi-worker runs."""
