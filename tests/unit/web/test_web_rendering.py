"""Stored text becomes inert HTML, and the CSRF tokens of the page forms hold."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from web.csrf import CSRF_COOKIE, CsrfFailed, check_form_token, form_token
from web.pages.common import decode_flash, encode_flash, safe_next
from web.pages.templating import avatar_text
from web.rendering import ALLOWED_TAGS, MATHML_ATTRIBUTES, render_markdown

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
    "```python\n</code></pre><script>alert(1)</script>\n```",
    "$\\href{javascript:alert(1)}{x}$",
    "$<script>alert(1)</script>$",
    "$$\\style{background:url(javascript:alert(1))}{x}$$",
    '$x$<math><mi xlink:href="javascript:alert(1)">x</mi></math>',
    "$\\mathrm{<img src=x onerror=alert(1)>}$",
    "$\\text{<img src=x onerror=alert(1)>}$",
    "$$\\text{</math><img src=x onerror=alert(1)>}$$",
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
        assert set(attrs) <= {"href", "title", "start", "align", "class", "rel"} | MATHML_ATTRIBUTES, (text, html)
        assert not (attrs.get("href") or "").lower().startswith("javascript"), (text, html)


def test_markdown_is_rendered_with_safe_links_code_and_tables() -> None:
    html = str(render_markdown(
        "**bold** and `code`\n\n[site](https://example.com)\n\n```python\nx = 1 < 2\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    ))
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert '<a href="https://example.com" rel="nofollow noopener noreferrer">site</a>' in html
    assert '<pre><code class="language-python"><span class="n">x</span> <span class="o">=</span>' in html
    assert '<span class="o">&lt;</span>' in html  # highlighted by Pygments, and still escaped
    assert "<table>" in html and "<td>2</td>" in html


def test_markup_inside_maths_stays_text() -> None:
    html = str(render_markdown("$\\text{<b>bold</b>}$"))
    assert "<b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html


def test_code_is_highlighted_only_in_a_language_pygments_knows() -> None:
    assert '<span class="k">def</span>' in str(render_markdown("```py\ndef f(): pass\n```"))
    for fence in ("```\ndef f(): pass\n```", "```no-such-language\ndef f(): pass\n```"):
        html = str(render_markdown(fence))
        assert "<span" not in html and "def f(): pass" in html


def test_maths_between_dollars_becomes_mathml_and_money_stays_text() -> None:
    html = str(render_markdown("Area $\\pi r^2$, and $$\\frac{a}{b}$$ on its own line."))
    assert "<math display=\"inline\"><mrow><mi>π</mi><msup><mi>r</mi><mn>2</mn></msup></mrow></math>" in html
    assert "<mfrac>" in html
    assert "$" not in html
    assert str(render_markdown("It costs $5 and $10.")) == "<p>It costs $5 and $10.</p>\n"
    # what the converter cannot read stays the text it was
    assert str(render_markdown("$\\frac{a}{$ and more")) == '<p><span class=""><code>$\\frac{a}{$</code></span> and more</p>\n'


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
    for outside in ("https://evil.example", "//evil.example", "/\\evil.example", "", None, "c",
                    "/\t/evil.example", "/\n/evil.example", "/c/\\..\\x", "/c\x7f"):
        assert safe_next(outside) == "/c"


def test_flash_messages_survive_the_cookie_and_garbage_is_ignored() -> None:
    assert decode_flash(encode_flash("notice", "Saved; all good = yes")) == {"kind": "notice", "text": "Saved; all good = yes"}
    assert decode_flash("not base64 json") is None
    assert decode_flash(None) is None


def test_an_avatar_falls_back_to_the_first_letter_of_the_name() -> None:
    assert avatar_text({"avatar": " 🦜 ", "name": "Polly"}) == "🦜"
    assert avatar_text({"avatar": "", "name": "polly"}) == "P"
    assert avatar_text({"name": ""}) == "?"
