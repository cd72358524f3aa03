"""dery: reassemble pretrained networks into one that fits a measured latency budget.

Importing the package loads no torch: the solver and the CLI's usage paths stay light. dery's own timm
architectures register themselves when the zoo first builds a network (`dery.models`).
"""
from .errors import DeryError, InternalError

__version__ = "0.1.0"
__all__ = ["DeryError", "InternalError", "__version__"]
