"""Run profiles.

Every chapter runs at one of three scales, chosen by a papermill ``parameters`` cell whose
default (``None``) defers to the environment variable ``SGDRANK_PROFILE``, and then to ``book``:

- ``smoke``: what CI executes -- seconds per chapter, only checks that everything runs;
- ``book``:  the published outputs -- minutes per chapter on a 2-core CPU;
- ``paper``: the papers' own scale (CIFAR-10, hundreds of epochs) -- GPU hours.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

PROFILES = ("smoke", "book", "paper")
ENV_VAR = "SGDRANK_PROFILE"
DEFAULT = "book"


def resolve(profile: str | None = None) -> str:
    """Return the profile name to use: ``profile`` if given, else ``$SGDRANK_PROFILE``, else ``book``.

    Raises ``ValueError`` with the valid names for anything else.
    """
    name = profile if profile is not None else os.environ.get(ENV_VAR) or DEFAULT
    name = str(name).strip().lower()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} "
            f"(set the notebook's `profile` parameter or the environment variable {ENV_VAR})"
        )
    return name


class Settings(dict):
    """The settings of one profile: a dict whose keys are also attributes.

    Displays in a notebook as a table that names the profile, so a reader always sees the
    scale at which the outputs below were produced.
    """

    def __init__(self, profile: str, values: Mapping[str, Any]):
        super().__init__(values)
        self.profile = profile

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"profile {self.profile!r} has no setting {key!r}") from None

    def _rows(self):
        return [(k, repr(v)) for k, v in self.items()]

    def __repr__(self) -> str:
        width = max([len(k) for k in self] + [7])
        lines = [f"profile: {self.profile}"] + [f"  {k:<{width}}  {v}" for k, v in self._rows()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(
            f"<tr><td><code>{escape(k)}</code></td><td><code>{escape(v)}</code></td></tr>"
            for k, v in self._rows()
        )
        return (
            f"<table><caption>profile <b>{escape(self.profile)}</b></caption>"
            f"<thead><tr><th>setting</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"
        )


def select(table: Mapping[str, Mapping[str, Any]], profile: str | None = None) -> Settings:
    """Pick one profile's settings from ``table`` (``{profile name: {setting: value}}``).

    Every profile must define the same keys, so a chapter cannot silently depend on a setting
    that exists in one profile only.
    """
    name = resolve(profile)
    missing = [p for p in PROFILES if p not in table]
    if missing:
        raise ValueError(f"settings table lacks profile(s) {missing}; it must define {PROFILES}")
    keys = set(table[PROFILES[0]])
    for p in PROFILES[1:]:
        if set(table[p]) != keys:
            raise ValueError(
                f"profiles define different settings: {sorted(keys ^ set(table[p]))} differ "
                f"between {PROFILES[0]!r} and {p!r}"
            )
    return Settings(name, table[name])
