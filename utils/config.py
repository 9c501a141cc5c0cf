"""Settings from YAML, validated into typed, frozen dataclasses.

A config file is read with ``yaml.safe_load`` and turned into the dataclass tree below; an
unknown key, a missing required key or a value of the wrong type is an error that names the
file, the key and what is allowed. Command-line overrides use ``--set section.key=value``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The built-in synthetic dataset (see :mod:`utils.synthetic_dataset`).

    Attributes:
        out_dir: folder the cases are written to (KiTS19 layout).
        cases: number of procedural cases.
        seed: master seed of the generator.
        matrix: in-plane size in voxels (512 as in KiTS19).
        spacing: fixed ``[z, y, x]`` voxel size in mm, or null to draw KiTS19-like spacings.
        workers: parallel processes.
    """

    out_dir: str = "data/synthetic"
    cases: int = 6
    seed: int = 0
    matrix: int = 512
    spacing: tuple[float, float, float] | None = None
    workers: int = 1


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the end-to-end demo (``make demo``)."""

    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    reports_dir: str = "reports/demo"


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one YAML value against a type annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(annotation):
        return build_config(annotation, value, where)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and not (isinstance(value, annotation) and not
                                               (annotation is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be of type {annotation.__name__}, got {value!r}")
    return value


def build_config(cls: type, mapping: Any, where: str = "config") -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(mapping[name], hints[name], f"{where}.{name}") for name in mapping}
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | os.PathLike, cls: type = DemoConfig, overrides: typing.Sequence[str] = ()) -> Any:
    """Read a YAML config file into the dataclass ``cls``, after applying ``--set`` overrides.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid YAML, unknown keys or wrong types (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    for override in overrides:
        keys, value = parse_override(override)
        target = mapping
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {override!r}: {key} is not a section")
        target[keys[-1]] = value
    try:
        return build_config(cls, mapping, where=str(path))
    except ValueError as error:
        raise ValueError(str(error)) from None


def config_as_dict(config: Any) -> dict:
    """The resolved config as plain Python data (for saving beside outputs and for wandb)."""
    return dataclasses.asdict(config)
