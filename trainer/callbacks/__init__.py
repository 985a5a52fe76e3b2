"""Callbacks: plug-ins for the loop. `base.Callback`'s docstring shows where each hook fires."""

from trainer.callbacks.base import Callback

__all__ = ["Callback"]
