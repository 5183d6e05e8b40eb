"""moetool: inspect, convert, upcycle, quantize, prune and profile Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"
