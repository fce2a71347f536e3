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
    ("refresh_ms_per_step", "refresh ms/step", "{:.1f}"),
    ("init_seconds", "init s", "{:.2f}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("final_val_ppl", "val ppl", "{:.2f}"),
)


def with_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows plus ``state_vs_adamw`` / ``time_vs_adamw``: optimizer-state MB and ms/step over
    those of the suite's AdamW baseline (its first trained ``adamw`` row), when it has one."""
    baseline = next((r for r in rows if r.get("method") == "adamw" and r.get("kind") in ("full", "optim")
                     and r.get("ms_per_step")), None)
    if baseline is None:
        return [dict(row) for row in rows]
    ratios = {"state_vs_adamw": "optimizer_state_mb", "time_vs_adamw": "ms_per_step"}
    return [dict(row, **{ratio: row[key] / baseline[key] if row.get(key) is not None and baseline[key] else None
                         for ratio, key in ratios.items()}) for row in rows]


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparable columns (plus the early-loss column)."""
    rows = with_ratios(rows)
    early = next((k for row in rows for k in row if k.startswith("val_loss_at_")), None)
    optional = ("state_vs_adamw", "time_vs_adamw", "refresh_ms_per_step")  # shown when some row has them
    columns = [c for c in COLUMNS if c[0] not in optional or any(row.get(c[0]) is not None for row in rows)]
    if early:
        columns.insert(-2, (early, early.replace("val_loss_at_", "loss@"), "{:.4f}"))
    return [c[1] for c in columns], [[_fmt(row.get(key), pattern) for key, _, pattern in columns] for row in rows]


def format_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A fixed-width text table of the comparable columns (plus the early-loss column)."""
    header, body = table_cells(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
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
        for row in rows:
            if row.get("note"):
                page.paragraph(f"{row['setup']}: {row['note']}", note=True)
    page.heading("validation loss")
    page.figure(png_path, "Validation loss against step, every set-up of every suite (loss_curves.png).")
    html_path = page.write(out_dir / "results.html")
    return [json_path, csv_path, png_path, html_path]


def plot_curves(suites: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """One panel per suite: validation loss against step for every set-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4.2), squeeze=False)
    for ax, (suite, rows) in zip(axes[0], suites.items()):
        for row in rows:
            points = [(h["step"], h["val_loss"]) for h in row["history"] if "val_loss" in h]
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, marker="o", markersize=3, label=row["setup"])
        ax.set_title(f"{suite}: validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
