"""Stored text to safe HTML: Markdown through markdown-it-py, then the nh3 sanitiser.

Two locks, either of which would do alone: markdown-it runs with raw HTML off (a `<script>`
in a message is text, escaped), and its output is cleaned by nh3 against a short allow
list (no `img`, no event attributes, links only to http, https and mailto). Whatever a
model reply, a persona or a user writes, what reaches the page is inert markup.

Code blocks that name their language are highlighted on the server by Pygments (spans with
its short class names, styled by `static/highlight.css`); `$...$` and `$$...$$` become MathML
(latex2mathml), which the browser draws itself: no script renders either. A `$` next to a
digit is money, not maths ("$5 and $10")."""

from __future__ import annotations

from html import escape, unescape
from xml.etree.ElementTree import tostring

import nh3
from latex2mathml.converter import convert_to_element
from markdown_it import MarkdownIt
from markupsafe import Markup
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

MAX_HIGHLIGHTED_CHARS = 20_000  # a longer block is shown plain
MAX_MATH_CHARS = 2_000


def highlight_code(code: str, language: str, _attrs: str) -> str:
    """A fenced block's code as Pygments spans ("" leaves it to markdown-it, escaped)."""
    name = language.split()[0].lower() if language else ""
    if name not in LANGUAGES or len(code) > MAX_HIGHLIGHTED_CHARS:  # a known few: lexers cost time
        return ""
    try:
        lexer = get_lexer_by_name(name)
    except ClassNotFound:
        return ""
    return str(highlight(code, lexer, HtmlFormatter(nowrap=True)))


def render_math(latex: str, options: dict[str, bool]) -> str:
    """LaTeX as MathML; what latex2mathml cannot read stays as the text it was. Serialised
    here, escaped (latex2mathml's own `convert` unescapes its output: `\\text{<img ...>}`
    would come out as markup)."""
    display = "block" if options.get("display_mode") else "inline"
    try:
        if len(latex) > MAX_MATH_CHARS:
            raise ValueError("too long")
        math = convert_to_element(latex, display=display)
        for element in math.iter():  # its text holds entity references ("&#x003C0;"): as characters,
            element.text = unescape(element.text) if element.text else element.text  # escaped again below
        return tostring(math, encoding="unicode")
    except Exception:  # noqa: BLE001 - any input the converter chokes on is shown as written
        delimiter = "$$" if display == "block" else "$"
        return f"<code>{escape(delimiter + latex + delimiter)}</code>"


# html=False: raw HTML in the text is escaped, never passed through.
_md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False, "highlight": highlight_code}).enable(
    ["table", "strikethrough"]
).use(dollarmath_plugin, allow_digits=False, double_inline=True, renderer=render_math)

MATHML_TAGS = {
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msup", "msub", "msubsup", "mfrac", "msqrt",
    "mroot", "mover", "munder", "munderover", "mtable", "mtr", "mtd", "mstyle", "mpadded", "mphantom",
    "menclose", "semantics", "annotation",
}
MATHML_ATTRIBUTES = {
    "display", "mathvariant", "stretchy", "fence", "separator", "accent", "accentunder", "lspace", "rspace",
    "columnalign", "rowalign", "columnspacing", "rowspacing", "width", "height", "depth", "linethickness",
    "movablelimits", "notation", "scriptlevel", "displaystyle", "minsize", "maxsize", "symmetric", "form",
}
ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td", "span", "div",
} | MATHML_TAGS
ALLOWED_ATTRIBUTES = {  # class: allowed_classes
    "a": {"href", "title"}, "ol": {"start"}, "th": {"align"}, "td": {"align"},
    **{tag: MATHML_ATTRIBUTES for tag in MATHML_TAGS},
}
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
        allowed_classes={
            "code": {f"language-{name}" for name in LANGUAGES},
            "span": set(STANDARD_TYPES.values()) - {""},  # Pygments' token classes
            "div": {"math"},
        },
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
