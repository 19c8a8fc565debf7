"""The protocol of every stage's settings: read from the validated config, passed on as JSON text.

A stage's settings are a frozen dataclass. ``from_config(config)`` reads them from the validated
config (Snakemake's ``validate`` and :func:`maisi.config.validate_config` have filled the schema's
defaults and rejected unknown keys, so a settings class neither repeats nor re-checks them);
``to_json()`` gives stable JSON text, which the rules pass as a job parameter (any change reruns that
stage only) and ``from_json`` reads back in the job. ``to_dict()`` is the same as plain data, for
sidecars and for settings nested in other settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar, Self

from maisi.core.schema import as_tuples, check_values, plain

__all__ = ["ConfigSettings"]


class ConfigSettings:
    """Mixin of the settings protocol: ``from_config``, ``to_dict``, ``to_json``, ``from_dict``, ``from_json``.

    ``SECTION`` names the settings' config block: every field the schema defines there (and ``variant`` and
    ``device``, under ``model``) is checked against the schema's rule when the settings are made, so settings
    built in Python obey the same constraints as a config, written once. Subclasses that define
    ``__post_init__`` (for checks that span fields) call ``super().__post_init__()``.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        values = asdict(self)  # type: ignore[call-overload]
        if self.SECTION:
            check_values(self.SECTION, values)
        check_values("model", {k: v for k, v in values.items() if k in ("variant", "device")})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """The settings from the whole validated config (each class picks its blocks)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The inverse of :meth:`to_dict` (lists become tuples)."""
        return cls(**{k: as_tuples(v) for k, v in data.items()})  # an unknown key is a TypeError

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))  # type: ignore[call-overload]

    def to_json(self) -> str:
        """Stable JSON text (a Snakemake param: any change reruns the stage)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """The inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
