"""dery: reassemble pretrained networks into one that fits a measured latency budget."""
__version__ = "0.1.0"
