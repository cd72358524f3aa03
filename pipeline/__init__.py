"""dery: reassemble pretrained networks into one that fits a measured latency budget."""
from . import models  # noqa: F401  (registers MobileNeXt with timm)
from .errors import DeryError

__version__ = "0.1.0"
__all__ = ["DeryError", "__version__"]
