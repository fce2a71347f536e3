"""``report.html`` of ``rankwise inspect``: the :func:`~rankwise.analyze.inspection.inspect_model`
dict as tables and PNG plots on one self-contained page (:class:`rankwise.report_html.HtmlPage`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from rankwise.report_html import HtmlPage

_LAW_COLOURS = {"volume": "#c0392b", "area": "#2471a3", "log": "#1e8449"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: Any, pattern: str = "{:.3g}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(value)


def _short(name: str) -> str:
    """A layer name short enough for an axis: the block number and the leaf (``3.self_attn.q_proj``)."""
    parts = name.split(".")
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numbers[0]:]) if numbers else name


def _layer_table(page: HtmlPage, report: dict[str, Any]) -> None:
    fits = report["power_law"]
    header = ["layer", "shape", "effective rank", "stable rank", "energy rank (90%)", "spectral norm",
              "nuclear norm", "alpha", "KS distance", "alpha says"]
    rows = []
    for row in report["layers"]:
        fit = fits.get(row["name"], {})
        rows.append([row["name"], "x".join(str(d) for d in row["shape"]), _fmt(row["effective_rank"], "{:.1f}"),
                     _fmt(row["stable_rank"], "{:.2f}"), _fmt(row["energy_rank"], "{:.0f}"),
                     _fmt(row["spectral_norm"], "{:.2f}"), _fmt(row["nuclear_norm"], "{:.1f}"),
                     _fmt(fit.get("alpha"), "{:.2f}"),
                     _fmt(fit.get("ks_distance"), "{:.3f}"), fit.get("verdict", "too few eigenvalues")])
    page.table(header, rows, numeric=range(2, 9))


def _spectra_figure(report: dict[str, Any]):
    plt = _pyplot()
    spectra = report["spectra"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = plt.cm.viridis([i / max(1, len(spectra) - 1) for i in range(len(spectra))])
    for colour, (name, values) in zip(colours, spectra.items()):
        top = values[0] if values and values[0] > 0 else 1.0
        positions = [(k + 0.5) / len(values) for k in range(len(values))]
        axes[0].plot(positions, [v / top for v in values], color=colour, lw=0.9, alpha=0.8)
        fit = report["power_law"].get(name)
        if fit:
            eigenvalues = sorted((v * v for v in values if v > 0), reverse=True)
            axes[1].plot(range(1, len(eigenvalues) + 1), eigenvalues, color=colour, lw=0.9, alpha=0.8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("k / min(out, in)")
    axes[0].set_ylabel("sigma_k / sigma_1")
    axes[0].set_title("singular values of every layer (colour: depth, dark = first)")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("rank k")
    axes[1].set_ylabel("eigenvalue sigma_k^2 of W^T W")
    axes[1].set_title("eigenvalue rank plot (a power-law tail is a straight line)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def _by_layer_figure(report: dict[str, Any]):
    plt = _pyplot()
    rows = report["layers"]
    labels = [_short(r["name"]) for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    axes[0].plot(x, [r["effective_rank"] / min(r["shape"]) for r in rows], "o-", ms=3, label="effective rank (RankMe)")
    axes[0].plot(x, [r["stable_rank"] / min(r["shape"]) for r in rows], "s-", ms=3, label="stable rank")
    axes[0].plot(x, [r["energy_rank"] / min(r["shape"]) for r in rows], "^-", ms=3, label="rank for 90% energy")
    axes[0].set_ylabel("rank / min(out, in)")
    axes[0].set_title("rank measures by layer")
    axes[0].set_ylim(0, 1.18)
    axes[0].legend(fontsize=8, ncol=3, loc="upper center")
    alphas = [report["power_law"].get(r["name"], {}).get("alpha") for r in rows]
    axes[1].axhspan(2, 6, color="#2e86c1", alpha=0.12, label="well-trained range 2-6")
    axes[1].axhline(8, color="#999", ls=":", lw=1, label="> 8: no heavy tail")
    axes[1].plot([i for i, a in zip(x, alphas) if a is not None], [a for a in alphas if a is not None], "o-", ms=3,
                 color="#af601a", label="alpha")
    axes[1].set_ylabel("power-law alpha of W^T W")
    axes[1].set_title("heavy-tail exponent by layer (WeightWatcher fit)")
    axes[1].legend(fontsize=8)
    step = max(1, len(rows) // 28)
    for ax in axes:
        ax.set_xticks(x[::step])
        ax.set_xticklabels(labels[::step], rotation=70, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _profile_axes(ax, entropies: Sequence[float], ceiling: Sequence[float], law: dict[str, Any] | None, title: str):
    cuts = list(range(1, len(entropies) + 1))
    ax.plot(cuts, ceiling, color="#aaa", ls="--", lw=1)
    ax.plot(cuts, entropies, "o-", ms=3, color="#222")
    if law:
        best = law["fits"][law["law"]]
        ax.plot(cuts, best["predicted"], color=_LAW_COLOURS[law["law"]], lw=1.6)
        title += f"\n{law['law']} law, R2 {best['r2']:.2f}" if math.isfinite(best["r2"]) else f"\n{law['law']} law"
    ax.set_title(title, fontsize=8.5)
    ax.set_xlabel("cut l", fontsize=8)
    ax.set_ylabel("entropy (nats)", fontsize=8)
    ax.set_ylim(0, max(ceiling) * 1.08)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _grid(count: int, columns: int = 4):
    plt = _pyplot()
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.0 * rows + 0.5), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _finish_grid(fig) -> None:
    """One legend for every panel (below them), then the layout."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="#aaa", ls="--", label="ceiling ln min(D_left, D_right)"),
               Line2D([], [], color="#222", marker="o", ms=3, label="measured S_l")]
    handles += [Line2D([], [], color=colour, lw=1.6, label=f"{law} law fit") for law, colour in _LAW_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))


def _internal_section(page: HtmlPage, internal: dict[str, Any]) -> None:
    layers = internal["layers"]
    if not layers:
        page.paragraph("No layer was profiled (see the notes).", note=True)
        return
    what = "the update W1 - W0" if internal["of"] == "update" else "the weight W"
    first = next(iter(layers.values()))["profile"]
    page.paragraph(
        f"Each panel is the entanglement entropy S_l (natural log) of {what} read as a matrix product state: the "
        f"row index split into its prime factors ({'x'.join(map(str, first['row_factors']))}), then the column "
        f"index ({'x'.join(map(str, first['col_factors']))}), one site per factor, rows first. The middle cut is "
        "out | in, where S is the entropy of the matrix's own singular values (at most ln rank). The paper "
        "(arXiv 2601.06788) reports a volume law with a central dip ('entanglement valley') for LoRA updates of "
        "Q and V, and none for full fine-tuning. The coloured line is the law of least BIC.")
    fig, axes = _grid(len(layers))
    table = []
    for ax, (name, entry) in zip(axes, layers.items()):
        profile, law = entry["profile"], entry.get("law")
        _profile_axes(ax, profile["entropies"], profile["ceiling"], law,
                      f"{_short(name)} (valley {profile['valley']:.2f})")
        best = law["fits"][law["law"]] if law else {}
        table.append([name, law["law"] if law else "-", _fmt(best.get("r2"), "{:.3f}"),
                      _fmt(best.get("rmse"), "{:.3f}"), _fmt(profile["valley"], "{:.2f}"),
                      _fmt(max(profile["entropies"]), "{:.2f}"), len(profile["entropies"]) + 1])
    _finish_grid(fig)
    page.figure(fig, f"Internal entanglement profiles of {what}, with the fitted law.")
    page.table(["layer", "law", "R2", "RMSE", "valley depth", "max S", "sites"], table, numeric=range(2, 7))


def _external_section(page: HtmlPage, external: dict[str, Any]) -> None:
    page.paragraph(
        f"Attention probabilities on the first {external['tokens']} tokens of the text, every head of every layer, "
        "read as an MPS the same way (rows then columns, one site per factor 2). Each panel is the mean profile over "
        "the layer's heads with the law fitted to it; the table counts the law each head follows on its own. The "
        "paper reports an area law with logarithmic corrections (the 'log' law here, Calabrese-Cardy form).")
    layers = external["layers"]
    fig, axes = _grid(len(layers))
    table = []
    for ax, entry in zip(axes, layers):
        law = entry["law"]
        _profile_axes(ax, entry["mean_entropies"], entry["ceiling"], law,
                      f"layer {entry['layer']}: mean of {sum(entry['head_laws'].values())} heads")
        best = law["fits"][law["law"]]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(entry["head_laws"].items()))
        table.append([entry["layer"], law["law"], _fmt(best["r2"], "{:.3f}"), counts])
    _finish_grid(fig)
    page.figure(fig, "External (attention) entanglement profiles by layer, with the fitted law.")
    page.table(["layer", "law of the mean profile", "R2", "heads per law"], table, numeric=[0, 2])


def _updates_section(page: HtmlPage, updates: list[dict[str, Any]]) -> None:
    plt = _pyplot()
    page.paragraph(
        "A top-10 left singular vector of the tuned weight is an intruder dimension when its largest |cosine| with "
        "every base singular vector is below 0.5 ('LoRA vs Full Fine-tuning: An Illusion of Equivalence', arXiv "
        "2410.21228). LoRA tends to create them, full fine-tuning much less.")
    header = ["layer", "shape", "||dW||_F", "||dW|| / ||W0||", "update stable rank", "update effective rank",
              "intruders (top 10)"]
    rows = [[r["name"], "x".join(str(d) for d in r["shape"]), _fmt(r["update_norm"]), _fmt(r["relative_update"]),
             _fmt(r["update_stable_rank"], "{:.2f}"), _fmt(r["update_effective_rank"], "{:.1f}"),
             _fmt(r.get("intruder_dimensions"), "{:.0f}")] for r in updates]
    page.table(header, rows, numeric=range(2, 7))
    changed = [r for r in updates if r["update_norm"] > 0]
    if changed:
        fig, ax = plt.subplots(figsize=(12, 3.6))
        ax.bar(range(len(changed)), [r.get("intruder_dimensions") or 0 for r in changed], color="#7d3c98")
        ax.set_xticks(range(len(changed)))
        ax.set_xticklabels([_short(r["name"]) for r in changed], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("intruder dimensions (of the top 10)")
        ax.set_title("intruder dimensions by changed layer")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        page.figure(fig, "Intruder dimensions of each changed layer.")


def render(report: dict[str, Any], meta: Sequence[tuple[str, Any]], *, title: str = "rankwise inspect") -> HtmlPage:
    """The page of ``report`` (an :func:`inspect_model` dict); ``meta`` are ``(name, value)`` lines
    shown under the title (model, base, adapter, data, ...)."""
    page = HtmlPage(title, subtitle=f"{len(report['layers'])} layers")
    page.definitions(meta)
    for note in report["notes"]:
        page.paragraph(f"Note: {note}", note=True)
    page.heading("Spectra and heavy tails")
    page.figure(_spectra_figure(report), "Left: each layer's singular values relative to its largest. Right: the "
                                         "eigenvalues of W^T W by rank on log-log axes.")
    page.figure(_by_layer_figure(report), "Left: effective rank (RankMe), stable rank and the rank holding 90% of "
                                          "||W||_F^2, each over min(out, in). Right: the power-law exponent alpha "
                                          "of the eigenvalue tail (Martin & Mahoney, arXiv 1810.01075), with the "
                                          "well-trained range shaded.")
    page.heading("Layers")
    sizes = [f["num_eigenvalues"] for f in report["power_law"].values()]
    if sizes and min(sizes) < 300:
        page.paragraph(
            f"The alpha ranges (2-6 well trained, < 2 over-trained, > 8 no heavy tail) were drawn from large trained "
            f"layers with hundreds to thousands of eigenvalues; the smallest layer here has {min(sizes)}, so its fit "
            "is noisy and the verdict only indicative.", note=True)
    _layer_table(page, report)
    page.heading("Internal entanglement (weights)")
    _internal_section(page, report["entanglement"]["internal"])
    if report["entanglement"]["external"]:
        page.heading("External entanglement (attention)")
        _external_section(page, report["entanglement"]["external"])
    if report.get("updates"):
        page.heading("Fine-tuning update and intruder dimensions")
        _updates_section(page, report["updates"])
    if report.get("matrix_nuclear_norm"):
        score = report["matrix_nuclear_norm"]
        page.heading("Representations")
        page.paragraph(
            f"Matrix Nuclear-Norm (arXiv 2410.10672) of the final hidden states of {score['num_tokens']} tokens "
            f"(d = {score['hidden_size']}): {score['score']:.3f}, the sum of the largest min(N, d) column norms of the "
            f"centred, row-normalised states; the exact nuclear norm of that matrix is {score['nuclear_norm']:.3f} "
            "(with N >= d the score is an upper bound of it; the paper compares scores across models).")
    return page
