"""Build a typed config dataclass from one Hydra group (a dict): the one ``from_dict`` of the project.

Every config group that reaches library code (``data``, ``optim``, ``model``, ``model.overrides``,
``chunk``, ``parallel``) goes through here, so they all behave alike on bad input:

* an unknown key (``+chunk.sise=8k``) is an error listing the accepted keys;
* each value is checked against its field's annotation and the error names the key
  (``chunk.k='abc' must be an integer``). ``int`` accepts no bool and no float, ``float`` accepts
  ints, ``tuple[float, float]`` accepts a list of two numbers, ``X | None`` accepts null;
* fields marked ``field(metadata=SIZE)`` accept token sizes (``32k``, ``1m``, integers).

Annotations this does not know (unions of several types, custom classes) pass through unchanged,
for the dataclass's ``__post_init__`` to check.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from chunkflow_pl.utils.sizes import parse_size

SIZE: Mapping[str, bool] = types.MappingProxyType({"size": True})
T = TypeVar("T")


def accepted_keys(cls: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if f.init)


def check_fields(cls: type, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``d`` (a dict or an OmegaConf node) checked against the init fields of dataclass ``cls``;
    returns the converted values, keyed like ``d``. ``prefix`` is the config path (``chunk``)."""
    if hasattr(d, "_metadata"):  # an OmegaConf node: resolve interpolations first
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(d, resolve=True)  # type: ignore[assignment]
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix} must be a group of keys, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in d if k not in fields)
    if unknown:
        keys = ", ".join(f"{prefix}.{k}" for k in unknown)
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {keys}; accepted keys: "
                         f"{', '.join(accepted_keys(cls))}")
    hints = typing.get_type_hints(cls)
    return {k: _convert(f"{prefix}.{k}", v, hints[k], fields[k].metadata) for k, v in d.items()}


def from_dict(cls: type[T], d: Mapping[str, Any], prefix: str) -> T:
    """``cls(**check_fields(cls, d, prefix))``: the dataclass's own ``__post_init__`` checks the rest."""
    return cls(**check_fields(cls, d, prefix))


def _convert(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value  # several types: left to __post_init__
        try:
            return _convert(key, value, rest[0], meta)
        except ValueError as e:
            raise ValueError(f"{e} or null") from None
    if meta.get("size"):
        return parse_size(value, key=key)
    if dataclasses.is_dataclass(tp):  # a nested group (model.lora): typed the same way, keys named in full
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r} must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}={value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key}={list(value)!r} must be a list of {len(args)}")
        return tuple(_convert(f"{key}[{i}]", v, a, {}) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}={value!r} must be a list")
        return [_convert(f"{key}[{i}]", v, args[0], {}) if args else v for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}={value!r} must be a group of keys")
        return dict(value)
    return value
