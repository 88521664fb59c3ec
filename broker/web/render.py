"""The status page's HTML, from a ``Page`` (``zbroker.broker.web.model``) and one Jinja2 template.

Autoescape is on for everything: user, host and display names come from clients, and a
user named ``<script>`` must show as that text. Undefined names in the template raise
instead of rendering as nothing, so a renamed field fails the unit test, not the page.
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined

from zbroker.broker.web.model import Page

REFRESH = 5  # seconds between the browser's reloads of the page

_env = Environment(
    loader=PackageLoader("zbroker.broker.web", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=False,
)


def render_page(page: Page, refresh: int = REFRESH) -> str:
    return _env.get_template("status.html").render(page=page, refresh=refresh)
