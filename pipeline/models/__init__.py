"""dery's own architectures, registered with timm when imported."""
from . import mobilenext  # noqa: F401
