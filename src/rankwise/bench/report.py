"""Turn benchmark rows into a printed table, results.json, results.csv and a loss-curve PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

COLUMNS = (
    ("setup", "set-up", "{}"),
    ("trainable_params", "trainable", "{:,}"),
    ("optimizer_state_mb", "opt-state MB", "{:.2f}"),
    ("state_vs_adamw", "state/AdamW", "{:.3f}"),
    ("peak_memory_mb", "peak MB", "{:.1f}"),
    ("ms_per_step", "ms/step", "{:.0f}"),
    ("time_vs_adamw", "time/AdamW", "{:.2f}"),
    ("time_vs_lora", "step/LoRA", "{:.2f}"),
    ("forward_ms", "fwd ms", "{:.1f}"),
    ("forward_vs_lora", "fwd/LoRA", "{:.2f}"),
    ("refresh_ms_per_step", "refresh ms/step", "{:.1f}"),
    ("init_seconds", "init s", "{:.2f}"),
    ("initial_val_loss", "start loss", "{:.4f}"),
    ("early_val_loss", "early loss", "{:.4f}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("final_val_ppl", "val ppl", "{:.2f}"),
)
#: shown only when some row has a value
OPTIONAL = ("state_vs_adamw", "time_vs_adamw", "time_vs_lora", "forward_ms", "forward_vs_lora", "refresh_ms_per_step", "initial_val_loss", "early_val_loss",
            "final_val_ppl")


def with_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows plus the ratios to the suite's baselines, where it has them: ``state_vs_adamw`` /
    ``time_vs_adamw`` (optimizer-state MB and ms/step over those of its first trained ``adamw``
    row) and ``time_vs_lora`` / ``forward_vs_lora`` (ms/step and evaluation-forward ms over
    those of its first trained LoRA adapter row)."""
    adamw = next((r for r in rows if r.get("method") == "adamw" and r.get("kind") in ("full", "optim")
                  and r.get("ms_per_step")), None)
    lora = next((r for r in rows if r.get("method") == "lora" and r.get("kind") == "adapter"
                 and r.get("ms_per_step")), None)
    ratios = []
    if adamw is not None:
        ratios += [("state_vs_adamw", "optimizer_state_mb", adamw), ("time_vs_adamw", "ms_per_step", adamw)]
    if lora is not None:
        ratios += [("time_vs_lora", "ms_per_step", lora), ("forward_vs_lora", "forward_ms", lora)]
    return [dict(row, **{ratio: row[key] / baseline[key] if row.get(key) is not None and baseline.get(key) else None
                         for ratio, key, baseline in ratios}) for row in rows]


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def column_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the loss columns mean for these rows (the early step, the objective)."""
    notes = ["start loss: validation loss before the first step"]
    early_steps = sorted({row["early_step"] for row in rows if row.get("early_val_loss") is not None})
    if early_steps:
        notes.append(f"early loss: validation loss at step {', '.join(map(str, early_steps))}")
    objectives = sorted({row["objective"] for row in rows if row.get("objective")})
    if objectives and objectives != ["causal language modelling"]:
        notes.append(f"loss: {', '.join(objectives)}")
    return notes


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparable columns (optional ones when some row has them)."""
    rows = with_ratios(rows)
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or any(row.get(c[0]) is not None for row in rows)]
    return [c[1] for c in columns], [[_fmt(row.get(key), pattern) for key, _, pattern in columns] for row in rows]


def format_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A fixed-width text table of the comparable columns, with a line saying what the loss columns are."""
    header, body = table_cells(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    trained = [row for row in rows if not row.get("note")]
    if trained:
        lines.append("(" + "; ".join(column_notes(trained)) + ")")
    lines += [f"note: {row['setup']}: {row['note']}" for row in rows if row.get("note")]
    return "\n".join(lines)


def write_results(out_dir: Path, suites: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> list[Path]:
    """Write results.json (everything), results.csv (one row per set-up), loss_curves.png and
    results.html (the tables and the curves on one self-contained page)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suites = {name: with_ratios(rows) for name, rows in suites.items()}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({"meta": meta, "suites": suites}, indent=2))

    csv_path = out_dir / "results.csv"
    flat = [{"suite": name, **{k: v for k, v in row.items() if k not in ("history", "setup_spec")}}
            for name, rows in suites.items() for row in rows]
    fields: list[str] = []
    for row in flat:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)

    png_path = out_dir / "loss_curves.png"
    plot_curves(suites, png_path)

    from rankwise.report_html import HtmlPage

    page = HtmlPage("rankwise bench", subtitle=", ".join(f"{name}: {len(rows)} set-ups" for name, rows in suites.items()))
    page.definitions((key, ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value)
                     for key, value in meta.items())
    for name, rows in suites.items():
        page.heading(f"suite {name}")
        header, body = table_cells(rows)
        page.table(header, body, numeric=range(1, len(header)))
        trained = [row for row in rows if not row.get("note")]
        if trained:
            page.paragraph("; ".join(column_notes(trained)), note=True)
        for row in rows:
            if row.get("note"):
                page.paragraph(f"{row['setup']}: {row['note']}", note=True)
    page.heading("validation loss")
    page.figure(png_path, "Validation loss against step, every set-up of every suite (loss_curves.png).")
    html_path = page.write(out_dir / "results.html")
    return [json_path, csv_path, png_path, html_path]


#: line styles: 10 colours x 4 dash patterns, each with its own marker, so 40 set-ups stay distinct
_COLOURS = "tab10"
_DASHES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def setup_style(index: int) -> dict[str, Any]:
    """Colour, dash pattern and marker of the ``index``-th set-up of a suite (distinct for the first 40)."""
    import matplotlib

    colour = matplotlib.colormaps[_COLOURS](index % 10)
    return {"color": colour, "linestyle": _DASHES[(index // 10) % len(_DASHES)], "marker": _MARKERS[index % len(_MARKERS)]}


def _points(row: dict[str, Any]) -> list[tuple[int, float]]:
    points = [(h["step"], h["val_loss"]) for h in row.get("history", []) if "val_loss" in h]
    if row.get("initial_val_loss") is not None and not row.get("resumed_from_step"):
        points.insert(0, (0, row["initial_val_loss"]))
    return points


def _size_label(row: dict[str, Any]) -> str:
    parts = []
    if row.get("trainable_params") is not None:
        parts.append(f"{row['trainable_params']:,} trainable")
    if row.get("optimizer_state_mb") is not None:
        parts.append(f"{row['optimizer_state_mb']:.2f} MB state")
    return " · ".join(parts)


def plot_curves(suites: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Write :func:`results_figure` of ``suites`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = results_figure(suites)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_figure(suites: dict[str, list[dict[str, Any]]]):
    """One row per suite: validation loss against step for every set-up (from the loss before
    training at step 0; zoomed on training when the start is far above), each set-up in its
    own :func:`setup_style`, legend outside the axes; beside it the final validation loss of
    each set-up as a sorted bar chart in the same colours, annotated with its trainable
    parameters and optimizer-state MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plotted = {suite: [row for row in rows if _points(row)] for suite, rows in suites.items()}
    plotted = {suite: rows for suite, rows in plotted.items() if rows} or {"(no trained set-ups)": []}
    heights = [max(3.6, 0.32 * len(rows) + 1.2) for rows in plotted.values()]
    fig, axes = plt.subplots(len(plotted), 2, figsize=(17, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "width_ratios": [1.15, 1]},
                             layout="constrained")
    for (curves, bars), (suite, rows) in zip(axes, plotted.items()):
        styles = {row["setup"]: setup_style(i) for i, row in enumerate(rows)}
        for row in rows:
            steps, losses = zip(*_points(row))
            curves.plot(steps, losses, markersize=4, linewidth=1.4, label=row["setup"], **styles[row["setup"]])
        title = f"{suite}: validation loss by step"
        trained = [loss for row in rows for step, loss in _points(row) if step > 0]
        starts = [loss for row in rows for step, loss in _points(row) if step == 0]
        if starts and len(trained) > len(rows) and max(starts) > max(trained):
            # the start is far above: zoom on training (a short run keeps the start in view)
            low, high = min(trained), max(trained)
            pad = 0.08 * (high - low or abs(high) * 0.01)
            curves.set_ylim(low - pad, high + pad)
            shown = f"{min(starts):.4g}" if f"{min(starts):.4g}" == f"{max(starts):.4g}" else \
                f"{min(starts):.4g} to {max(starts):.4g}"
            title += f"\n(the loss before training, {shown} at step 0, is above the axis)"
        curves.set_title(title)
        curves.set_xlabel("step (0 = before training)")
        curves.set_ylabel("validation loss")
        curves.grid(alpha=0.3)
        curves.xaxis.set_major_locator(MaxNLocator(integer=True))
        if rows:
            curves.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                          title="set-up", title_fontsize=8, frameon=False)
        finished = sorted((row for row in rows if row.get("final_val_loss") is not None),
                          key=lambda row: row["final_val_loss"], reverse=True)
        if not finished:
            bars.axis("off")
            continue
        losses = [row["final_val_loss"] for row in finished]
        low, high = min(losses), max(losses)
        margin = max(0.05 * (high - low), 0.02 * abs(high) or 0.01)
        left = low - margin
        positions = range(len(finished))
        bars.barh(positions, [loss - left for loss in losses], left=left, height=0.7,
                  color=[styles[row["setup"]]["color"] for row in finished],
                  hatch=None, edgecolor="black", linewidth=0.4)
        for position, row in zip(positions, finished):
            dash = styles[row["setup"]]["linestyle"]
            if dash != "-":  # same colour as another set-up: the bar carries its dash pattern too
                bars.barh(position, row["final_val_loss"] - left, left=left, height=0.7, fill=False,
                          hatch={"--": "//", "-.": "..", ":": "xx"}[dash], edgecolor="white", linewidth=0)
            bars.text(row["final_val_loss"], position, f" {row['final_val_loss']:.4f}   {_size_label(row)}",
                      va="center", fontsize=7.5)
        bars.set_yticks(list(positions), [row["setup"] for row in finished], fontsize=8)
        span = high + margin - left
        bars.set_xlim(left, high + margin + 0.9 * span)  # room for the annotations
        bars.set_xlabel(f"final validation loss (axis starts at {left:.3g}; lower is better)")
        bars.set_title(f"{suite}: final loss, trainable parameters, optimizer state")
        bars.grid(axis="x", alpha=0.3)
    return fig
