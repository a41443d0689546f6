"""Stored text becomes inert HTML, and the CSRF tokens of the page forms hold."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from web.csrf import CSRF_COOKIE, CsrfFailed, check_form_token, form_token
from web.pages import avatar_text, decode_flash, encode_flash, safe_next
from web.rendering import ALLOWED_TAGS, render_markdown

ATTACKS = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "<svg onload=alert(1)>",
    '<a href="javascript:alert(1)">x</a>',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "![x](javascript:alert(1))",
    '<iframe src="https://example.com"></iframe>',
    "<style>body{display:none}</style>",
    '<div style="background:url(javascript:alert(1))">x</div>',
    "```html\n<script>alert(1)</script>\n```",
    '<details open ontoggle="alert(1)">x</details>',
]


class Elements(HTMLParser):
    """The elements and attributes a browser would build from an HTML fragment."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


@pytest.mark.parametrize("text", ATTACKS)
def test_markup_in_a_message_never_becomes_live_html(text: str) -> None:
    html = str(render_markdown(text))
    for tag, attrs in Elements(html).found:
        assert tag in ALLOWED_TAGS, (text, html)
        assert set(attrs) <= {"href", "title", "start", "align", "class", "rel"}, (text, html)
        assert not (attrs.get("href") or "").lower().startswith("javascript"), (text, html)


def test_markdown_is_rendered_with_safe_links_code_and_tables() -> None:
    html = str(render_markdown(
        "**bold** and `code`\n\n[site](https://example.com)\n\n```python\nx = 1 < 2\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    ))
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert '<a href="https://example.com" rel="nofollow noopener noreferrer">site</a>' in html
    assert '<pre><code class="language-python">x = 1 &lt; 2\n</code></pre>' in html
    assert "<table>" in html and "<td>2</td>" in html


def test_raw_html_is_shown_as_text() -> None:
    assert str(render_markdown("a <b>b</b>")) == "<p>a &lt;b&gt;b&lt;/b&gt;</p>\n"


def test_a_form_token_is_bound_to_the_browser_and_the_session() -> None:
    secret = b"k" * 32
    token = form_token(secret, "seed", "session-a")
    check_form_token(secret, {CSRF_COOKIE: "seed", "session": "session-a"}, token)
    for cookies, submitted in [
        ({CSRF_COOKIE: "seed", "session": "session-a"}, None),             # no token
        ({"session": "session-a"}, token),                                 # no cookie
        ({CSRF_COOKIE: "other", "session": "session-a"}, token),           # another browser
        ({CSRF_COOKIE: "seed", "session": "session-b"}, token),            # another session
        ({CSRF_COOKIE: "seed", "session": "session-a"}, token[:-1] + "0"),  # tampered
    ]:
        with pytest.raises(CsrfFailed):
            check_form_token(secret, cookies, submitted)
    with pytest.raises(CsrfFailed):
        check_form_token(b"another secret".ljust(32), {CSRF_COOKIE: "seed", "session": "session-a"}, token)


def test_only_local_paths_are_followed_after_logging_in() -> None:
    assert safe_next("/c/123?q=x") == "/c/123?q=x"
    for outside in ("https://evil.example", "//evil.example", "/\\evil.example", "", None, "c"):
        assert safe_next(outside) == "/c"


def test_flash_messages_survive_the_cookie_and_garbage_is_ignored() -> None:
    assert decode_flash(encode_flash("notice", "Saved; all good = yes")) == {"kind": "notice", "text": "Saved; all good = yes"}
    assert decode_flash("not base64 json") is None
    assert decode_flash(None) is None


def test_an_avatar_falls_back_to_the_first_letter_of_the_name() -> None:
    assert avatar_text({"avatar": " 🦜 ", "name": "Polly"}) == "🦜"
    assert avatar_text({"avatar": "", "name": "polly"}) == "P"
    assert avatar_text({"name": ""}) == "?"
