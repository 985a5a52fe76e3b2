"""Metric loggers. Only rank zero builds them; `LoggerGroup` keeps a failing one from stopping a run."""

from trainer.loggers.base import Logger, LoggerGroup

__all__ = ["Logger", "LoggerGroup"]
