"""`_target_` nodes: which targets a config may name, what keys they take, and building them.

A node names a callable (`_target_`) under one of the config's `allowed_targets` prefixes; every
other key must be a parameter of that callable, with a value of the annotated type. `build`
instantiates a checked node with Hydra, and turns a `ValueError` that the target raises about its
arguments into a `ConfigError` naming the key.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from trainer.errors import ConfigError, require


def resolve_target(path: str, key: str, allowed: Sequence[str]) -> Any:
    require(
        isinstance(path, str) and path.startswith(tuple(allowed)),
        f"{key}._target_",
        f"{path!r} is outside the allowed module prefixes {list(allowed)} "
        "(add yours to `allowed_targets`)",
    )
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}._target_: cannot import {path!r} ({err})") from None


def check_target(
    node: Mapping[str, Any], key: str, allowed: Sequence[str], injected: Sequence[str] = ()
) -> None:
    """Refuse a `_target_` node whose keys are not parameters of the target, or of the wrong type.

    `injected` names the arguments the trainer supplies itself (e.g. a model's `input_shape`).
    """
    require(isinstance(node, Mapping) and "_target_" in node, key, "needs a `_target_`")
    target = resolve_target(node["_target_"], key, allowed)
    signature = inspect.signature(target)
    params = signature.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: skip type checks, keep the key checks
        hints = {}
    for name, value in node.items():
        if name.startswith("_") and name.endswith("_"):  # _target_, _partial_, ...
            continue
        require(
            name not in injected,
            f"{key}.{name}",
            "is set by the trainer; remove it from the config",
        )
        if name not in params:
            require(
                takes_kwargs,
                f"{key}.{name}",
                f"unknown key for {node['_target_']} (it takes: {', '.join(p for p in params if p not in injected and p != 'self')})",
            )
            continue
        expected = hints.get(name)
        if expected is not None and not _matches(value, expected):
            raise ConfigError(
                f"{key}.{name}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}"
            )
    # A target may check what the generic check cannot see: the nested `_target_` nodes it
    # builds itself (trainer.callbacks.torch_schedule.TorchScheduler's scheduler).
    check_config = getattr(target, "check_config", None)
    if check_config is not None:
        check_config(node, key, allowed)


def _matches(value: Any, expected: Any) -> bool:
    """A forgiving isinstance for the annotations configs use (int, float, Sequence[int], ...)."""
    origin = typing.get_origin(expected)
    if expected is Any or isinstance(expected, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        expected = origin
    if expected in (Sequence, list, tuple, typing.Sequence):
        return isinstance(value, Sequence) and not isinstance(value, str)
    if isinstance(expected, type):
        try:
            return isinstance(value, expected)
        except TypeError:
            return True
    return True  # annotations we do not model (Callable, Literal, ...) are left to the target


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def build(node: Mapping[str, Any], key: str, allowed: Sequence[str], **injected: Any) -> Any:
    """Instantiate a validated `_target_` node, passing `injected` arguments the target accepts."""
    check_target(node, key, allowed, injected=tuple(injected))
    target = resolve_target(node["_target_"], key, allowed)
    params = inspect.signature(target).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in injected.items() if takes_kwargs or k in params}
    try:
        return instantiate(dict(node), **accepted, _convert_="all")
    except InstantiationException as err:
        # A target checks its own arguments and raises ValueError (a dropout of 2, a fraction
        # of 1.5): that is the config's fault, and gets the config's one line.
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise ConfigError(_keyed(key, params, cause)) from None
        raise


# "pruning.sparsity: must be ..." or "val_fraction must be ...": a message that starts with the
# argument it is about.
_ABOUT_ARGUMENT = re.compile(r"(?:[\w.]+\.)?(\w+)(?::\s*|\s+(?=must\b))(.+)")


def _keyed(key: str, params: Mapping[str, Any], err: Exception) -> str:
    """`err`'s first line under the key of the argument it names, else under the node's key."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    about = _ABOUT_ARGUMENT.fullmatch(text)
    if about and about.group(1) in params:
        return f"{key}.{about.group(1)}: {about.group(2)}"
    return f"{key}: {text}"
