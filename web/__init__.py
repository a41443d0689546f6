"""The web UI: server-rendered pages (Litestar + Jinja2) on resource routes, beside the JSON API.

`pages/` holds the page controllers (one module per resource), `rendering.py` turns stored text into sanitised
HTML, `csrf.py` guards every form; templates live in `templates/`, the one plain-JS script
(the websocket stream) and the stylesheet in `static/`."""
