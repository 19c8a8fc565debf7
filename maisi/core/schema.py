"""The config schema (``config/schema.yaml``): the one place that defines config keys, types and defaults.

Snakemake's ``validate`` (and :func:`maisi.config.validate_config` outside Snakemake) fills the
defaults into the config; the stages' settings classes take their own defaults from here too, so a
default is written once, in the schema.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SCHEMA_FILE", "load_schema", "schema_default", "schema_enum", "source_default", "check_values", "plain", "as_tuples"]

#: ``config/schema.yaml``, shipped in the package as ``maisi/data/schema.yaml`` (a link to it in a checkout).
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data" / "schema.yaml"


def plain(value: Any) -> Any:
    """Tuples as lists, recursively (JSON's view of a settings value)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def as_tuples(value: Any) -> Any:
    """Lists as tuples, recursively (frozen dataclasses hold tuples; YAML and JSON give lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuples(v) for v in value)
    return value



@functools.cache
def _schema() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SCHEMA_FILE.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (a safe loader)


def load_schema() -> dict[str, Any]:
    """The schema as a new dict (callers may change it)."""
    return copy.deepcopy(_schema())


def _node(key: str) -> dict[str, Any]:
    """The schema of a dotted config key (``KeyError`` naming the key when the schema has none)."""
    node = _schema()
    for part in key.split("."):
        props = node.get("properties", {})
        if part not in props:
            raise KeyError(f"config/schema.yaml has no key {key!r}")
        node = props[part]
    return node


def schema_default(key: str) -> Any:
    """The schema's default of a dotted config key, e.g. ``"train_vae.steps"`` (lists as tuples).

    Raises ``KeyError`` naming the key when the schema has no such key or no default for it.
    """
    node = _node(key)
    if "default" not in node:
        raise KeyError(f"config/schema.yaml gives no default for {key!r}")
    return as_tuples(copy.deepcopy(node["default"]))


def source_default(source_type: str, key: str) -> Any:
    """The schema's default of a source option, e.g. ``source_default("phantom", "n_cases")`` (lists as tuples)."""
    for branch in _schema()["$defs"]["source"]["allOf"]:
        if branch["if"]["properties"]["type"].get("const") == source_type:
            node = branch["then"]["properties"].get(key, {})
            if "default" not in node:
                raise KeyError(f"config/schema.yaml gives no default for the {source_type} source option {key!r}")
            return as_tuples(copy.deepcopy(node["default"]))
    raise KeyError(f"config/schema.yaml has no source type {source_type!r}")


def schema_enum(key: str) -> tuple[Any, ...]:
    """The values the schema allows for a dotted config key (its ``enum``, or its items' for an array), in the
    schema's order."""
    node = _node(key)
    return tuple(node["enum"] if "enum" in node else node["items"]["enum"])


@functools.cache
def _key_validator(key: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator({"$defs": _schema().get("$defs", {}), **_node(key)})


def check_values(section: str, values: Mapping[str, Any]) -> None:
    """Check each value whose key the schema defines under ``section`` against the schema's rule for it.

    Settings built in Python (not from a validated config) get the same constraints, written once in the
    schema; a ``ValueError`` names the config key. Keys the section does not define are not checked.
    """
    for key in _node(section).get("properties", {}):
        if key in values:
            error = next(iter(_key_validator(f"{section}.{key}").iter_errors(plain(values[key]))), None)
            if error is not None:
                raise ValueError(f"config key '{section}.{key}': {error.message}")
