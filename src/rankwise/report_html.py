"""One self-contained HTML page: headings, text, key-value lists, tables and PNG figures.

Used by ``rankwise inspect`` (report.html) and ``rankwise bench`` (results.html). The page
needs nothing but itself: the style sheet is inline and every figure is a PNG embedded as a
``data:`` URI, so it can be mailed, archived or opened offline. Text is HTML-escaped.

    page = HtmlPage("rankwise inspect", subtitle="tiny base, 4 layers")
    page.heading("Layers")
    page.table(["layer", "alpha"], [["q_proj", "3.1"]], numeric=[1])
    page.figure(fig, "Spectra")     # a matplotlib Figure (closed after rendering) or a PNG path
    page.write("report.html")
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable, Sequence

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d1d1f; margin: 0;
       background: #f6f6f8; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-top: 1.3em; }
p.subtitle { color: #555; margin-top: 0; }
p.note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.86em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f0f0f3; text-align: left; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
div.scroll { max-height: 520px; overflow: auto; display: inline-block; max-width: 100%; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; font-size: 0.92em; }
dt { color: #555; } dd { margin: 0; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; max-width: 1000px; }
nav a { margin-right: 14px; font-size: 0.92em; }
"""


def png_bytes(figure: Any, dpi: int = 110) -> bytes:
    """A matplotlib Figure rendered to PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


class HtmlPage:
    """A page built section by section; :meth:`render` gives the HTML text, :meth:`write` saves it."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.header = f"<h1>{html.escape(title)}</h1>"
        if subtitle:
            self.header += f'<p class="subtitle">{html.escape(subtitle)}</p>'
        self.parts: list[str] = []
        self.sections: list[tuple[str, str]] = []

    def heading(self, text: str, level: int = 2) -> None:
        anchor = ""
        if level == 2:
            anchor = f"s{len(self.sections) + 1}"
            self.sections.append((anchor, text))
        self.parts.append(f'<h{level}{f" id={anchor!r}" if anchor else ""}>{html.escape(text)}</h{level}>')

    def paragraph(self, text: str, *, note: bool = False) -> None:
        self.parts.append(f'<p{" class=note" if note else ""}>{html.escape(text)}</p>')

    def definitions(self, items: Iterable[tuple[str, Any]]) -> None:
        """A two-column list of ``(name, value)``."""
        body = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
        self.parts.append(f"<dl>{body}</dl>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (),
              caption: str = "") -> None:
        """A table of already formatted cells; columns in ``numeric`` are right-aligned."""
        numeric = set(numeric)
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{html.escape(str(c))}</td>'
                             for i, c in enumerate(row)) + "</tr>"
            for row in rows
        )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>'
                          f"<tbody>{body}</tbody></table></div>")

    def figure(self, image: Any, caption: str = "", *, alt: str = "") -> None:
        """A PNG figure: a matplotlib Figure, PNG bytes, or the path of a PNG file."""
        if isinstance(image, (str, Path)):
            data = Path(image).read_bytes()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            data = png_bytes(image)
        encoded = base64.b64encode(data).decode("ascii")
        text = html.escape(alt or caption or "figure")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{text}" src="data:image/png;base64,{encoded}">{cap}</figure>')

    def render(self) -> str:
        nav = ""
        if len(self.sections) > 2:
            nav = "<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.sections) + "</nav>"
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>"
                f"<body><main>{self.header}{nav}{''.join(self.parts)}</main></body></html>\n")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
