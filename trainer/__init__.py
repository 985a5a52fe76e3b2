"""hooktrain: one readable training loop, scale-out by configuration, optimization as callbacks."""

__version__ = "0.1.0"
