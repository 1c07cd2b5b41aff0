"""The planner: which distribution a model should run under.

`candidates` lists the distributions to choose among for a device count;
`memory.estimate` predicts each one's bytes per device from a copy of the
model built once on the host (`profile`), without running it distributed.

Example:

```python
from tfscale import planner

for c in planner.candidates(4):
    e = planner.estimate(make_model, c, global_batch_size=64, optimizer="adam")
    print(f"{c.description:60} {e}")
```
"""

from tfscale.planner.candidates import Candidate
from tfscale.planner.candidates import candidates
from tfscale.planner.memory import InfeasibleError
from tfscale.planner.memory import MemoryEstimate
from tfscale.planner.memory import estimate

__all__ = [
    "Candidate",
    "InfeasibleError",
    "MemoryEstimate",
    "candidates",
    "estimate",
]
