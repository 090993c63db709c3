"""Settings with their help text, TRL style: one place states a setting's default and meaning.

The CLI reads both from here (``default_of``/``help_of``) instead of restating them, so
`winnow ingest --help` and a recipe can never disagree with the library's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["default_of", "help_of", "setting"]


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:  # noqa: A002
    """A dataclass field carrying its help text (``metadata["help"]``, as TRL's configs do)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def default_of(cls: type, name: str) -> Any:
    f = _field(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def help_of(cls: type, name: str) -> str:
    return _field(cls, name).metadata.get("help", "")
