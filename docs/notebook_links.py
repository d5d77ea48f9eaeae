"""MkDocs hook: the tutorial notebook's links to other pages point at those pages on the site.

The notebook links as a Markdown page does (``concepts.md#exact-readout``), which is right where the notebook is
read as a file (GitHub, Jupyter); mkdocs-jupyter renders it to ``tutorial/`` and leaves those links as written, so
on the site they were 404s. A link to a page that does not exist is a warning, which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import logging
import posixpath
import re

from mkdocs.utils import get_relative_url

LOG = logging.getLogger("mkdocs.hooks.notebook_links")
LINK = re.compile(r'href="(?![a-z]+:|#|/)([^"#]+\.md)(#[^"]*)?"')


def on_page_content(html: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs' hook signature)
    if not page.file.src_uri.endswith(".ipynb"):
        return html

    def site_url(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match[1]))
        file = files.get_file_from_path(target)
        if file is None:
            LOG.warning("%s links to %s, which is not a page of the site", page.file.src_uri, match[1])
            return match[0]
        return f'href="{get_relative_url(file.url, page.url)}{match[2] or ""}"'

    return LINK.sub(site_url, html)
