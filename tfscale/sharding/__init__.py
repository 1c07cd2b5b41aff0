"""Layout-based model sharding for Keras on TensorFlow, with DTensor.

`tfscale.distribution("dtensor", mesh=..., layout_map=...)` is the usual way
in; this package holds its parts: mesh specs, layout maps, the strategy
that makes Keras variables DTensor variables, and the memory report.

Example:

```python
report = tfscale.sharding.memory_report(model)
print(report)
```
"""

from tfscale.sharding.layout_map import LayoutMap
from tfscale.sharding.memory import MemoryReport
from tfscale.sharding.memory import VariableMemory
from tfscale.sharding.memory import memory_report
from tfscale.sharding.mesh import MeshSpec
from tfscale.sharding.mesh import build_mesh
from tfscale.sharding.strategy import DTensorStrategy
from tfscale.sharding.variables import ShardedVariable
from tfscale.sharding.variables import gather

__all__ = [
    "DTensorStrategy",
    "LayoutMap",
    "MemoryReport",
    "MeshSpec",
    "ShardedVariable",
    "VariableMemory",
    "build_mesh",
    "gather",
    "memory_report",
]
