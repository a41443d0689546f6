"""Stored text to safe HTML: Markdown through markdown-it-py, then the nh3 sanitiser.

Two locks, either of which would do alone: markdown-it runs with raw HTML off (a `<script>`
in a message is text, escaped), and its output is cleaned by nh3 against a short allow
list (no `img`, no event attributes, links only to http, https and mailto). Whatever a
model reply, a persona or a user writes, what reaches the page is inert markup."""

from __future__ import annotations

import nh3
from markupsafe import Markup
from markdown_it import MarkdownIt

# html=False: raw HTML in the text is escaped, never passed through.
_md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False}).enable(
    ["table", "strikethrough"]
)

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}  # class: allowed_classes
URL_SCHEMES = {"http", "https", "mailto"}
MAX_RENDERED_CHARS = 200_000  # a message is at most a few thousand characters; a bound anyway


def sanitize(html: str) -> str:
    """Clean an HTML fragment down to the allow list."""
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        clean_content_tags={"script", "style"},
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="nofollow noopener noreferrer",
        allowed_classes={"code": {f"language-{name}" for name in LANGUAGES}},
    )


def render_markdown(text: str) -> Markup:
    """Markdown source to sanitised HTML, marked safe for Jinja's autoescape."""
    if not text:
        return Markup("")
    return Markup(sanitize(_md.render(text[:MAX_RENDERED_CHARS])))


# code fence languages that keep their class (for styling); any other class is dropped
LANGUAGES = (
    "python", "py", "javascript", "js", "typescript", "ts", "json", "bash", "sh", "shell", "sql",
    "html", "css", "c", "cpp", "rust", "go", "java", "yaml", "toml", "text", "markdown", "md",
)
