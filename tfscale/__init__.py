"""tfscale: scale Keras training on TensorFlow from one device to many hosts."""

from tfscale.devices import DevicesAlreadyInitializedError
from tfscale.devices import configure_devices
from tfscale.devices import local_devices
from tfscale.distribution import Distribution
from tfscale.distribution import distribution
from tfscale.distribution import kinds

__version__ = "0.1.0"

__all__ = [
    "DevicesAlreadyInitializedError",
    "Distribution",
    "configure_devices",
    "distribution",
    "kinds",
    "local_devices",
]
