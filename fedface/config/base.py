"""The flat-config base: typed dataclasses over Flower's flat ``run_config``.

Flower passes settings as a flat dictionary of scalars with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml``, ``flwr run . -c "key=value"``). A
:class:`FlatConfig` subclass is a dataclass of such scalars with defaults:
:meth:`FlatConfig.from_run_config` reads the dictionary (unknown keys are refused with
the list of valid ones, values are coerced to the field's type),
:meth:`FlatConfig.to_run_config` writes it back, and :meth:`FlatConfig.validate`
collects *every* problem the subclass's :meth:`FlatConfig.problems` finds into one
message. :class:`fedface.config.RunConfig` is one; each capability's own config (the
anonymizers, templates, ...) is another, listed in ``pyproject.toml`` if Flower must
carry it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="FlatConfig")


class FlatConfig:
    """Base of fedface's configs (mix into a ``@dataclass``).

    A field named ``extra`` (a dict) is not a setting: it carries free-form run
    metadata and is merged into :meth:`to_dict`.
    """

    #: Names the config in "Invalid <what>: ..." messages.
    WHAT: ClassVar[str] = "configuration"

    def __post_init__(self) -> None:
        self.validate()

    def problems(self) -> list[str]:
        """Every setting that cannot work, each saying what to change (none: valid)."""
        return []

    def validate(self) -> None:
        """Refuse settings that cannot work: all problems in one message."""
        problems = self.problems()
        if problems:
            raise ValueError(f"Invalid {self.WHAT}: " + "; ".join(problems))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (snake_case keys), as written to ``metrics.json``."""
        d = {name: getattr(self, name) for name in self.field_names()}
        d.update(getattr(self, "extra", {}) or {})
        return d

    def to_run_config(self) -> dict[str, Any]:
        """Flat kebab-case dict for Flower's ``run_config``."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items()}

    @classmethod
    def from_run_config(cls: type[C], run_config: dict[str, Any], **overrides: Any) -> C:
        """Build from Flower's ``run_config`` (kebab- or snake-case keys).

        Unknown keys are refused with the list of valid ones; values are coerced to
        the field's type (``flwr run -c`` gives strings and ints).
        """
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in {**dict(run_config), **overrides}.items():
            name = key.replace("-", "_")
            if name not in types or name == "extra":
                unknown.append(key)
                continue
            kwargs[name] = coerce(value, types[name], key)
        if unknown:
            valid = ", ".join(k.replace("_", "-") for k in cls.field_names())
            raise ValueError(f"Unknown run-config keys {unknown}. Valid keys: {valid}")
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def coerce(value: Any, type_name: Any, key: str) -> Any:
    """``value`` as the field's type (``bool``, ``int``, ``float``, ``str``); a value that
    is not one is refused naming the key."""
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    try:
        if type_name == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "str":
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"run-config {key}={value!r} is not a valid {type_name}") from None
    return value
