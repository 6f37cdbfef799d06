"""Minimal self-contained HTML reports: sections of text, tables and images (embedded as data URIs so
one file can be opened or logged to MLflow on its own). Hand-written: a page of tables needs no
templating engine."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
         "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}"
         "td:first-child{text-align:left}img{image-rendering:pixelated;max-width:100%}.note{color:#555}")


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(rows: Iterable[dict], columns: list[str], digits: int = 3) -> str:
    def cell(v):  # a float; a pair of floats (an interval) as "low–high"; anything else as text
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, float) for x in v):
            return "–".join(f"{x:.{digits}f}" for x in v)
        return f"{v:.{digits}f}" if isinstance(v, float) else esc("" if v is None else v)

    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{''.join(f'<th>{esc(c)}</th>' for c in columns)}</tr>{body}</table>"


def image(path: str | Path, caption: str = "", width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    size = f' width="{width}"' if width else ""
    return f'<figure><img src="data:image/png;base64,{data}"{size}><figcaption>{esc(caption)}</figcaption></figure>'


def page(title: str, sections: list[tuple[str, str]], note: str = "") -> str:
    """sections: (heading, inner HTML)."""
    parts = "".join(f"<h2>{esc(h)}</h2>{body}" for h, body in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{esc(title)}</h1><p class='note'>{esc(note)}</p>{parts}</body></html>")
