"""Reading YAML settings into typed, frozen dataclasses, with ``--set section.key=value`` overrides.

A config file is read with ``yaml.safe_load`` and turned into a dataclass tree; an unknown key,
a missing required key or a value of the wrong type is an error that names the file, the key
and what is allowed. The dataclasses themselves live beside this module: the data sections in
:mod:`utils.config.data`, a training experiment in :mod:`utils.config.experiment`, a search in
:mod:`utils.config.search` and the demo in :mod:`utils.config.demo`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


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
    if origin is tuple and typing.get_args(annotation)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(annotation)[0]
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and not (isinstance(value, annotation) and not
                                               (annotation is int and isinstance(value, bool))):
        hint = ""
        if annotation is str and isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans
            hint = ("; YAML reads an unquoted no, yes, off or on as a boolean: quote the text "
                    "(in a file key: \"no\", on the command line --set 'section.key=\"no\"')")
        raise ValueError(f"{where} must be of type {annotation.__name__}, got {value!r}{hint}")
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
    try:
        return cls(**values)
    except ValueError as error:  # a __post_init__ rule
        raise ValueError(f"{where}: {error}") from None



def check_choice(name: str, value: Any, choices: typing.Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the setting, the allowed values and the value received."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")



def check_positive(name: str, values: Any) -> None:
    """Raise ``ValueError`` unless every value (a number or a sequence of numbers) is > 0."""
    seq = values if isinstance(values, (tuple, list)) else (values,)
    if not all(v > 0 for v in seq):
        raise ValueError(f"{name} must be > 0, got {values!r}")



def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value.

    Raises:
        ValueError: no ``=``, an empty key or key part, or a value that is not valid YAML (the
            message names the override, the key and the value).
    """
    key, sep, raw = text.partition("=")
    keys = [part.strip() for part in key.split(".")]
    if not sep or not all(keys):
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = " ".join(str(getattr(error, "problem", "") or error).split())
        raise ValueError(f"override {text!r}: the value {raw!r} of {'.'.join(keys)} is not valid YAML ({problem}); "
                         "quote strings and close brackets, e.g. section.key=[1,2,3]") from None
    return keys, value



def load_config(path: str | os.PathLike, cls: type, overrides: typing.Sequence[str] = ()) -> Any:
    """Read a YAML config file into the dataclass ``cls``, after applying ``--set`` overrides.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid YAML, unknown keys or wrong types (the message names the file).
    """
    mapping = _read_with_overrides(Path(path), overrides)
    try:
        return build_config(cls, mapping, where=str(path))
    except ValueError as error:
        raise ValueError(str(error)) from None



def load_config_sections(path: str | os.PathLike, sections: Mapping[str, type],
                         overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """Read only some top-level sections of a config file, each into its dataclass.

    Lets a tool that needs, say, ``preprocessing`` and ``split`` read them from any config file
    (the demo's or a model's); an absent section takes its defaults, other sections are ignored.
    """
    mapping = _read_with_overrides(Path(path), overrides)
    return {name: build_config(cls, mapping.get(name), where=f"{path}: {name}") for name, cls in sections.items()}



def _read_with_overrides(path: Path, overrides: typing.Sequence[str]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections (section: {{key: value}}), "
                         f"got a {type(mapping).__name__}: {_shorten(mapping)}")
    for override in overrides:
        keys, value = parse_override(override)
        target = mapping
        for key in keys[:-1]:
            if target.get(key) is None:  # absent, or an empty section in the file
                target[key] = {}
            target = target[key]
            if not isinstance(target, dict):
                raise ValueError(f"override {override!r}: {key} is not a section in {path} (it holds "
                                 f"{_shorten(target)})")
        target[keys[-1]] = value
    return mapping


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



def config_as_dict(config: Any) -> dict:
    """The resolved config as plain Python data (for saving beside outputs and for wandb)."""
    return dataclasses.asdict(config)

