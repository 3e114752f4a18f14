"""HTML rendering of the report: escaped tables, embedded figures, and the page template.

The page is self-contained: CSS is inlined from ``style.css``, figures are ``data:image/png``
URIs, and there is no script or external link, so it reads the same offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from string import Template

import pandas as pd

from pipeline.report.tables import Column, MainTable


def _resource(name: str) -> str:
    return resources.files("pipeline.report").joinpath(name).read_text(encoding="utf-8")


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def format_cell(mean: float, sd: float, percent: bool) -> str:
    """``mean ± sd`` (accuracies in %, R² with 3 decimals); only the mean when there is no sd."""
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(sd):
        text += f" ± {sd * scale:.{digits}f}"
    return text


def format_gain(value: float, percent: bool) -> str:
    """A signed difference of means: ``+0.081`` (R²) or ``+8.1`` (accuracies, percentage points)."""
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    return f"{value * scale:+.{digits}f}"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def paragraph(text: str, css: str = "caption") -> str:
    return f'<p class="{css}">{esc(text)}</p>'


def section(anchor: str, title: str, parts: Iterable[str]) -> str:
    return f'<section id="{esc(anchor)}">\n<h2>{esc(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def figure(data: bytes, alt: str, caption: str) -> str:
    """An ``<img>`` with the PNG inlined as base64."""
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _epsilon(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def main_table(table: MainTable) -> str:
    """The IFM-Table-2-style table: feature sets x outcome metrics, mean ± sd, best in bold; a
    combined row (baseline + run) also shows its gain over the baseline alone, in brackets."""
    head = ["Features", "Method", "ε", "Pooling"] + [c.label for c in table.columns]
    lines = ['<table class="main">', "<thead><tr>" + "".join(
        f'<th class="{"text" if i < 4 else "num"}">{esc(h)}</th>' for i, h in enumerate(head)) + "</tr></thead>",
        "<tbody>"]
    for row in table.rows:
        cells = [f'<td class="text">{esc(row.title)}</td>', f'<td class="text">{esc(row.method)}</td>',
                 f'<td class="text">{esc(_epsilon(row.epsilon))}</td>', f'<td class="text">{esc(row.pooling)}</td>']
        for column in table.columns:
            cell = table.cells.get((row.key, column))
            if cell is None:
                cells.append("<td>—</td>")
                continue
            text = esc(format_cell(cell[0], cell[1], column.percent))
            gain = table.gain.get((row.key, column))
            if gain is not None:
                text += f' <span class="gain">({esc(format_gain(gain, column.percent))})</span>'
            if row.key in table.best.get(column, ()):
                cells.append(f'<td class="best"><b>{text}</b></td>')
            else:
                cells.append(f"<td>{text}</td>")
        lines.append(f'<tr class="{esc(row.kind)}" data-key="{esc(row.key)}">' + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def readout_table(table: pd.DataFrame) -> str:
    """Feature sets x latent factors, cells ``mean ± sd`` of the read-out R²."""
    lines = ['<table class="readout">', '<thead><tr><th class="text">Features</th>'
             + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr></thead>", "<tbody>"]
    for label, row in table.iterrows():
        cells = [f'<td class="text">{esc(label)}</td>']
        for value in row:
            cells.append(f"<td>{esc(format_cell(value[0], value[1], False))}</td>" if isinstance(value, tuple)
                         else "<td>—</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def dataframe(frame: pd.DataFrame, text_columns: Sequence[str] = (), formats: Mapping[str, str] | None = None) -> str:
    """A plain table of a DataFrame (no index); ``formats`` maps a column to a format spec."""
    formats = formats or {}
    lines = ["<table>", "<thead><tr>" + "".join(
        f'<th class="{"text" if c in text_columns else "num"}">{esc(c)}</th>' for c in frame.columns)
        + "</tr></thead>", "<tbody>"]
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            if isinstance(value, float) and math.isnan(value):
                text = "—"
            elif column in formats:
                text = format(value, formats[column])
            else:
                text = str(value)
            css = ' class="text"' if column in text_columns else ""
            cells.append(f"<td{css}>{esc(text)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def key_values(pairs: Mapping[str, str]) -> str:
    """A two-column table of names and values."""
    rows = "".join(f'<tr><th class="text">{esc(k)}</th><td class="text">{esc(v)}</td></tr>' for k, v in pairs.items())
    return f"<table>\n<tbody>{rows}</tbody>\n</table>"


def page(title: str, date: str, config_hash: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole HTML document; ``sections`` are (anchor, title, rendered HTML)."""
    nav = " ".join(f'<a href="#{esc(anchor)}">{esc(name)}</a>' for anchor, name, _ in sections)
    body = "\n".join(content for _, _, content in sections)
    return Template(_resource("template.html")).substitute(
        title=esc(title), css=_resource("style.css"), date=esc(date), config_hash=esc(config_hash), nav=nav, body=body)


def column_legend(columns: Sequence[Column]) -> str:
    metrics = list(dict.fromkeys(c.metric for c in columns))
    words = {"r2": "R²: coefficient of determination of the (log) outcome",
             "acc": "acc: accuracy (%)", "acc1off": "1-off: predictions within one level (%)"}
    return "; ".join(words[m] for m in metrics)
