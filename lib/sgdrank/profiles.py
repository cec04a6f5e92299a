"""Run profiles.

Every chapter runs at one of four scales, chosen by a papermill ``parameters`` cell whose
default (``None``) defers to the environment variable ``SGDRANK_PROFILE``, and then to ``book``:

- ``smoke``: what CI executes -- seconds per chapter, only checks that everything runs;
- ``book``:  the published outputs -- minutes per chapter on a 2-core CPU;
- ``gpu``:   what a reader runs on Colab -- the papers' datasets and models (full widths where
  memory allows), fewer configurations or epochs, about an hour on a Tesla T4 by the estimate
  shown under the chapter's settings (:func:`sgdrank.cost.show_profiles`);
- ``paper``: the papers' own scale (CIFAR-10, hundreds of epochs) -- GPU hours on a cluster.

A settings table maps each profile to a dict of settings, or to the *name* of another profile
whose settings it shares (``"gpu": "paper"`` in the chapters whose paper scale takes minutes on
a CPU); the displayed table then says so.

**Dry run** (``SGDRANK_DRYRUN=1``, set by ``tools/dryrun.py`` / ``make dryrun``): a settings
table may have a fifth entry ``"dry"``, a dict of overrides applied on top of the ``"paper"`` or
``"gpu"`` settings when, and only when, one of those two profiles runs with ``SGDRANK_DRYRUN=1``
(with another profile that variable is an error, and so is a table without a ``"dry"`` entry: a
dry run must never start a full GPU-scale run by accident). The rule for what an override may
change, so that the dry run executes the profile's own code path:

- it keeps the profile's models (full widths), datasets and loaders, schedules (learning-rate
  milestones as fractions, decay factors), losses, engines and the lambda / batch-size grids;
- it only shortens lengths (one or two SGD steps per run: epochs, steps, stream lengths),
  data sizes (``n_train``, ``n_test``, pools, numbers of draws) and, where the full grid of a
  full-width model cannot fit the CI budget, reduces repetitions (seeds, learning rates) --
  never the widths. A chapter says so next to its ``"dry"`` entry.

Overrides must name keys that exist (else ``ValueError``). The displayed table says
``paper (dry run)`` and lists the overridden keys. ``select(..., dry=False)`` returns a
profile's full settings even in a dry run (what the cost estimate of the real run needs).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

PROFILES = ("smoke", "book", "gpu", "paper")
#: the profiles a dry run may shorten
DRY_PROFILES = ("gpu", "paper")
ENV_VAR = "SGDRANK_PROFILE"
DEFAULT = "book"
DRY = "dry"  # optional fourth entry of a settings table: overrides of "paper" for a dry run
DRY_ENV_VAR = "SGDRANK_DRYRUN"


def dry_run(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``$SGDRANK_DRYRUN`` is ``1`` (``0`` or unset: False; anything else: error)."""
    env = os.environ if environ is None else environ
    value = str(env.get(DRY_ENV_VAR, "") or "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{DRY_ENV_VAR}={value!r}: set it to 1 (dry run of the paper profile) "
                         f"or 0 / unset")
    return value == "1"


def resolve(profile: str | None = None) -> str:
    """Return the profile name to use: ``profile`` if given, else ``$SGDRANK_PROFILE``, else
    ``book``.

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

    def __init__(self, profile: str, values: Mapping[str, Any],
                 dry: tuple[str, ...] | None = None, same_as: str | None = None):
        super().__init__(values)
        self.profile = profile
        self.same_as = same_as  # the profile whose settings these are (a table's alias)
        # None: not a dry run; a tuple: a dry run of `profile` with these keys overridden
        self.dry_overrides = None if dry is None else tuple(dry)

    @property
    def dry(self) -> bool:
        """True in a dry run of the paper profile (``SGDRANK_DRYRUN=1``)."""
        return self.dry_overrides is not None

    @property
    def label(self) -> str:
        """``paper (dry run)`` in a dry run, ``gpu (= paper)`` for an alias, else the name."""
        name = self.profile + (f" (= {self.same_as})" if self.same_as else "")
        return f"{name} (dry run)" if self.dry else name

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"profile {self.profile!r} has no setting {key!r}") from None

    def _rows(self):
        return [(k, repr(v)) for k, v in self.items()]

    def __repr__(self) -> str:
        width = max([len(k) for k in self] + [7])
        lines = [f"profile: {self.label}"] + [f"  {k:<{width}}  {v}" for k, v in self._rows()]
        if self.dry:
            lines.append(f"dry-run overrides: {', '.join(self.dry_overrides) or 'none'}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        over = set(self.dry_overrides or ())
        rows = "".join(
            f"<tr><td><code>{escape(k)}</code></td><td><code>{escape(v)}</code>"
            f"{' (dry run)' if k in over else ''}</td></tr>"
            for k, v in self._rows()
        )
        note = ""
        if self.dry:
            note = (f" (dry run; overridden: "
                    f"{escape(', '.join(self.dry_overrides) or 'nothing')})")
        return (
            f"<table><caption>profile <b>{escape(self.label)}</b>{note}</caption>"
            f"<thead><tr><th>setting</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"
        )


def select(table: Mapping[str, Any], profile: str | None = None, *,
           dry: bool | None = None) -> Settings:
    """Pick one profile's settings from ``table`` (``{profile name: {setting: value}}``; a value
    may instead name another profile whose settings it shares, e.g. ``"gpu": "paper"``).

    Every profile must define the same keys, so a chapter cannot silently depend on a setting
    that exists in one profile only. An optional entry ``"dry"`` holds overrides of the paper
    and gpu settings for a dry run (``SGDRANK_DRYRUN=1``; see the module docstring for what they
    may change); they must name existing keys. ``dry``: None follows ``$SGDRANK_DRYRUN``;
    False gives the full settings whatever it says (cost estimates of the real run).
    """
    name = resolve(profile)
    unknown = [p for p in table if p not in PROFILES and p != DRY]
    if unknown:
        raise ValueError(f"settings table has unknown entries {unknown}; allowed: "
                         f"{', '.join(PROFILES)} and {DRY!r} (dry-run overrides of "
                         f"{' and '.join(DRY_PROFILES)})")
    missing = [p for p in PROFILES if p not in table]
    if missing:
        raise ValueError(f"settings table lacks profile(s) {missing}; it must define "
                         f"{PROFILES} (a profile may name another: \"gpu\": \"paper\")")

    def values(p: str) -> Mapping[str, Any]:
        v = table[p]
        if isinstance(v, str):
            if v not in PROFILES or isinstance(table[v], str):
                raise ValueError(f"profile {p!r} names {v!r}, which is not a profile with "
                                 f"settings of its own; choose one of "
                                 f"{[q for q in PROFILES if not isinstance(table[q], str)]}")
            return table[v]
        return v

    keys = set(values(PROFILES[0]))
    for p in PROFILES[1:]:
        if set(values(p)) != keys:
            raise ValueError(
                f"profiles define different settings: {sorted(keys ^ set(values(p)))} differ "
                f"between {PROFILES[0]!r} and {p!r}"
            )
    overrides = table.get(DRY)
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise ValueError(f"the {DRY!r} entry must be a dict of overrides of 'paper' and "
                             f"'gpu', got {type(overrides).__name__}")
        bad = sorted(set(overrides) - keys)
        if bad:
            raise ValueError(f"dry-run overrides {bad} name no setting of the table; "
                             f"the settings are {sorted(keys)}")
    same_as = table[name] if isinstance(table[name], str) else None
    if dry_run() if dry is None else dry:
        if name not in DRY_PROFILES:
            raise ValueError(f"{DRY_ENV_VAR}=1 is a dry run of the {' or '.join(DRY_PROFILES)} "
                             f"profile, but the profile is {name!r}: set {ENV_VAR}=paper (or "
                             f"gpu, or the notebook parameter profile='paper'), or unset "
                             f"{DRY_ENV_VAR}")
        if overrides is None:
            raise ValueError(f"{DRY_ENV_VAR}=1 but this settings table has no {DRY!r} entry: add "
                             f"one (overrides of 'paper' and 'gpu' that shorten the runs; {{}} "
                             f"if the settings are already small)")
        overridden = tuple(k for k in values(name) if k in overrides)
        return Settings(name, {**values(name), **overrides}, dry=overridden, same_as=same_as)
    return Settings(name, values(name), same_as=same_as)
