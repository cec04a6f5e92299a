"""The book's edition number on every page, from one source: :data:`sgdrank.__version__`.

A Sphinx extension (``_config.yml``: ``sphinx: extra_extensions: [sgdrank.edition]``). When the
book's configuration is read it sets Sphinx's ``version`` and ``release``, the MyST substitution
``{{ version }}`` and appends one line to the theme's ``extra_footer`` (shown under every page):
``Edition 0.2.0 (sgdrank 0.2.0)``, so that the version on the page, the library's and
``CITATION.cff``'s cannot drift apart unnoticed (``tests/test_book.py`` checks all three).

The package metadata (``pyproject.toml``) reads the same attribute
(``[tool.setuptools.dynamic] version = {attr = "sgdrank.__version__"}``).
"""
from __future__ import annotations

from . import __version__

#: The HTML element (class ``sgdrank-edition``) that carries the version in the footer.
FOOTER_CLASS = "sgdrank-edition"


def footer_html(version: str = __version__) -> str:
    """The footer line that shows the edition (CHANGELOG.md says what it contains)."""
    return (f'<p class="{FOOTER_CLASS}">Edition <span class="sgdrank-version">{version}</span> '
            f"(library <code>sgdrank {version}</code>; see CHANGELOG.md and CITATION.cff)</p>")


def _inject(app, config) -> None:
    config.version = config.release = __version__
    subs = dict(getattr(config, "myst_substitutions", None) or {})
    subs.setdefault("version", __version__)
    config.myst_substitutions = subs
    opts = dict(config.html_theme_options or {})
    opts["extra_footer"] = (opts.get("extra_footer") or "") + footer_html()
    config.html_theme_options = opts


def setup(app) -> dict:
    """Sphinx entry point."""
    app.connect("config-inited", _inject)
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
