"""The web UI: server-rendered pages (Litestar + Jinja2) on resource routes, beside the JSON API.

`pages.py` holds the page controllers, `rendering.py` turns stored text into sanitised
HTML, `csrf.py` guards every form; templates live in `templates/`, the one plain-JS script
(the websocket stream) and the stylesheet in `static/`."""
