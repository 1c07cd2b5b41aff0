"""The planner: which distribution a model should run under.

`candidates` lists the distributions to choose among for a device count;
`memory.estimate` predicts each one's bytes per device and
`step_time.predict` its step time, from a copy of the model built once on
the host (`profile`, `flops`) and this machine's measured rates
(`calibration`, measured by `measure` and `overhead`); `plan` chooses the fastest that fits, and the `"auto"`
kind (`auto`) trains under it.

Example:

```python
from tfscale import planner

result = planner.plan(make_model, global_batch_size=64, optimizer="adam")
print(result.table())
dist = tfscale.distribution("auto", model_fn=make_model, global_batch_size=64)
```
"""

from tfscale.planner.auto import PlannedDistribution
from tfscale.planner.calibration import Calibration
from tfscale.planner.calibration import DeviceRates
from tfscale.planner.calibration import StepOverhead
from tfscale.planner.candidates import Candidate
from tfscale.planner.candidates import candidates
from tfscale.planner.measure import calibrate
from tfscale.planner.memory import InfeasibleError
from tfscale.planner.memory import MemoryEstimate
from tfscale.planner.memory import estimate
from tfscale.planner.plan import Plan
from tfscale.planner.plan import Row
from tfscale.planner.plan import plan
from tfscale.planner.step_time import StepTime
from tfscale.planner.step_time import predict

__all__ = [
    "Calibration",
    "Candidate",
    "DeviceRates",
    "InfeasibleError",
    "MemoryEstimate",
    "Plan",
    "PlannedDistribution",
    "Row",
    "StepOverhead",
    "StepTime",
    "calibrate",
    "candidates",
    "estimate",
    "plan",
    "predict",
]
