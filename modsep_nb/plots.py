"""Figures for people: labelled axes, titles, readable task names, colour scales anchored at 0.

Every function returns a matplotlib Figure; `save` writes it as PNG (atomically) into a run's figures/.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import matplotlib.text
import matplotlib.ticker
import matplotlib.pyplot as plt  # headless, matplotlib falls back to Agg by itself
import numpy as np

from . import overlaps as ov
from .files import atomic_file
from .evaluation import own_and_others
from .pruning import select_neurons


def text_only(fig):
    """Every text of `fig` drawn as written, never as mathtext: a task named "money $$" (or a token holding "$")
    would otherwise be parsed as TeX and fail to draw. Set on the figure's own texts, not in matplotlib's global
    rcParams, which are the user's (and an explorer draws on a widget thread). Texts made later, at draw time,
    are numeric tick labels: every label with a name is set when the figure is built (set_xticks with labels)."""
    for text in fig.findobj(matplotlib.text.Text):
        text.set_parse_math(False)
    return fig


def _figure(build):
    """A figure builder whose figure comes back text_only."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        return text_only(build(*args, **kwargs))
    return wrapper


def save(fig, out_dir, name: str) -> Path:
    """Write `fig` to out_dir/figures/name.png (temp file, then rename) and return the path."""
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def _finish(fig, ax, *, title: str, xlabel: str, ylabel: str):
    """The line figures' common ending: labels, title, legend, grid, tight layout."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


@_figure
def heatmap(matrix, rows, cols=None, *, title: str, cbar_label: str, vmin: float = 0.0, vmax=None,
            cmap: str = "viridis", annotate: bool | None = None, fmt: str = ".2f", xlabel="", ylabel="", ci=None):
    """A task × task matrix; the colour scale starts at 0 unless told otherwise. ci [R, C, 2]: each cell's 95%
    interval, written under its value as ± half its width."""
    matrix = np.asarray(matrix, dtype=float)
    cols = rows if cols is None else cols
    size = max(4.0, 0.45 * len(cols) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, max(3.5, 0.45 * len(rows) + 2)))
    finite = matrix[np.isfinite(matrix)]
    vmax = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=max(vmax, vmin + 1e-9), aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if annotate if annotate is not None else len(rows) * len(cols) <= 150:
        mid = (vmin + vmax) / 2
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if np.isfinite(matrix[i, j]):
                    label = format(matrix[i, j], fmt)
                    if ci is not None and np.isfinite(ci[i][j]).all():
                        label += f"\n±{(ci[i][j][1] - ci[i][j][0]) / 2:{fmt}}"
                    ax.text(j, i, label, ha="center", va="center", fontsize=7 if ci is None else 6,
                            color="white" if matrix[i, j] < mid else "black")
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


@_figure
def sweep(fracs, curves: dict, *, title: str, ylabel: str, chance=None, xlabel="fraction of neurons selected",
          line_label: str = "median", band_label: str = "min–max"):
    """Lines against frac (log x); `curves` name -> values or name -> (low, mid, high) for a band (labelled
    `line_label` and `band_label`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        if isinstance(values, tuple) and len(values) == 3:
            low, mid, high = (np.asarray(v, dtype=float) for v in values)
            line, = ax.plot(fracs, mid, marker="o", label=f"{name} ({line_label})")
            ax.fill_between(fracs, low, high, alpha=0.2, color=line.get_color(), label=f"{name} ({band_label})")
        else:
            ax.plot(fracs, values, marker="o", label=name)
    if chance is not None:
        ax.plot(fracs, chance, "k--", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(list(fracs), [f"{f:.1%}" if f < 0.1 else f"{f:.0%}" for f in fracs])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    return _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)


@_figure
def layer_lines(curves: dict, *, title: str, ylabel: str, xlabel: str = "layer", bands: dict | None = None,
                ylim=None):
    """One line per name over layers; optional (low, high) bands, e.g. a null model's range."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        line, = ax.plot(range(len(values)), values, marker=".", label=name)
        if bands and name in bands:
            low, high = bands[name]
            ax.fill_between(range(len(values)), low, high, color=line.get_color(), alpha=0.15)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(bottom=0)
    return _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)


@_figure
def over_steps(steps, curves: dict, *, title: str, ylabel: str, null=None, null_label: str = "null",
               thin: dict | None = None, xlabel: str = "training step (log scale; 0 = initialisation)"):
    """Measures against training step on a symmetric-log axis (step 0, the initialisation, stays on it).
    curves: name -> (estimate [C], low [C], high [C]) drawn as a line with its 95% interval; null: a number,
    values [C], or (low [C], high [C]) drawn as a grey band; thin: name -> values [C], faint lines (e.g. per task)."""
    steps = np.asarray(steps, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in (thin or {}).items():
        ax.plot(steps, np.asarray(values, dtype=float), color="0.6", lw=0.7, alpha=0.6)
    if null is not None:
        if isinstance(null, tuple) and len(null) == 2:
            low, high = (np.broadcast_to(np.asarray(v, dtype=float), steps.shape) for v in null)
            ax.fill_between(steps, low, high, color="0.8", alpha=0.7, label=null_label)
        else:
            ax.plot(steps, np.broadcast_to(np.asarray(null, dtype=float), steps.shape), "k--", lw=1, label=null_label)
    for name, (mid, low, high) in curves.items():
        line, = ax.plot(steps, np.asarray(mid, dtype=float), marker="o", label=name)
        ax.fill_between(steps, np.asarray(low, dtype=float), np.asarray(high, dtype=float), color=line.get_color(),
                        alpha=0.2)
    ax.set_xscale("symlog", linthresh=1)
    # plain numbers: the default log labels are mathtext, which text_only would show raw ("$\\mathdefault{10^{1}}$")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(left=0)
    return _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)


@_figure
def cdfs(samples: dict, *, title: str, xlabel: str):
    """Empirical CDFs, one per name (e.g. pairwise overlaps of the trained vs random models)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in samples.items():
        values = np.sort(np.asarray(values, dtype=float))
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of task pairs")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


# -- the figures the notebooks share ------------------------------------------------------------------
@_figure
def mean_abs_per_layer(stats: dict, label: str):
    """Mean |activation| per layer (averaged over neurons), one line per task."""
    return layer_lines({t: s.mean_abs.mean(1).numpy() for t, s in stats.items()},
                       title=f"Mean |activation| per layer — {label}", ylabel="mean |activation| (averaged over neurons)")


@_figure
def cross_task(result, *, measure: str = "accuracy", intervals: dict | None = None):
    """The cross-task matrix M[A, B] (evaluation.CrossTaskResult) as a heatmap; in target mode the row labels
    carry the fraction found for each A (and "not reached" where bisection never reached the target). With
    `intervals` (evidence.cross_task_intervals) each entry carries its 95% interval over documents."""
    s = result.settings
    if s.get("target") is None:
        rows = result.tasks
        title = f"{measure} after pruning {s['frac']:.1%} of neurons ({s['mode']})" + (
            "\n± half the 95% interval, bootstrap over evaluation documents" if intervals is not None else "")
    else:
        rows = [f"{t} ({result.fracs[t]:.2%}{'' if result.converged.get(t) is not False else ', not reached'})"
                for t in result.tasks]
        title = f"Pruned until own {measure} ≈ {s['target']:.0%} of unpruned (fraction found in brackets)"
    return heatmap(result.matrix, rows, result.tasks, title=title, cbar_label=f"{measure} / unpruned {measure}",
                   vmax=max(1.0, float(np.nanmax(result.matrix))), ylabel="pruned for task A",
                   xlabel="evaluated on task B", ci=None if intervals is None else intervals["selected"]["ci"])


@_figure
def overlap_heatmap(summary: ov.OverlapSummary, metric: str, frac: float):
    """Task × task overlap (overlaps.summary) of the top-`frac` sets, with chance in the title."""
    return heatmap(getattr(summary, metric), summary.names, cbar_label=metric, vmax=1.0,
                   title=f"{metric} of top-{frac:.1%} neuron sets\n(chance: uniform {summary.chance[metric]:.3f}, "
                         f"layer-matched {summary.layer_chance[metric]:.3f})")


@_figure
def overlap_sweep(sw: dict, *, what: str = "task pairs", title: str | None = None):
    """min / median / max pairwise overlap against the fraction selected (overlaps.overlap_sweep), with
    uniform chance (dashed) and layer-matched chance (dotted, where the sweep has it)."""
    fig = sweep(sw["fracs"], {what: (sw["min"], sw["median"], sw["max"])}, chance=sw["chance"],
                title=title or f"Overlap coefficient over {what}", ylabel="overlap coefficient")
    if "layer_chance" in sw:
        ax = fig.axes[0]
        ax.plot(sw["fracs"], sw["layer_chance"], "k:", label="layer-matched chance")
        ax.legend(fontsize=8)
    return fig


@_figure
def selectivity(result, *, measure: str = "accuracy", intervals: dict | None = None):
    """Per pruned task: own and others' relative accuracy after pruning its selected neurons, beside the same
    after pruning as many random neurons in the same layers (evaluation.CrossTaskResult.selectivity); with
    `intervals` (evidence.cross_task_intervals) each bar carries its 95% bootstrap interval over documents."""
    sel = result.selectivity()
    x = np.arange(len(sel["tasks"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(x) + 2), 4))
    errors = [None] * 4
    if intervals is not None:
        errors = []
        for which in ("selected", "random"):
            samples = intervals[which]["samples"] if intervals.get(which) is not None else None
            parts = own_and_others(samples) if samples is not None else (None, None)
            errors += [None if p is None else np.nanquantile(p, [0.025, 0.975], axis=0) for p in parts]
    bars = [("own, selected neurons", sel["own"], "tab:red", 1.0), ("others, selected neurons", sel["others"], "tab:blue", 1.0),
            ("own, random neurons", sel["random_own"], "tab:red", 0.35),
            ("others, random neurons", sel["random_others"], "tab:blue", 0.35)]
    width = 0.2
    for i, ((label, values, color, alpha), band) in enumerate(zip(bars, errors)):
        yerr = None if band is None else np.clip(np.stack([values - band[0], band[1] - values]), 0, None)
        ax.bar(x + (i - 1.5) * width, values, width, color=color, alpha=alpha, label=label, yerr=yerr,
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"})
    ax.set_xticks(x, sel["tasks"], rotation=45, ha="right")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel(f"{measure} / unpruned {measure}")
    ax.set_title(f"Selectivity: others − own = {np.nanmean(sel['selectivity']):.2f} (selected) vs "
                 f"{np.nanmean(sel['random_selectivity']):.2f} (random, same count per layer)"
                 + ("\nbars: 95% intervals, bootstrap over evaluation documents" if intervals is not None else ""))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


@_figure
def overlap_pairs(evidence: dict, *, what: str = "task pairs", top: int = 40):
    """Each pair's overlap coefficient with its 95% interval (bootstrap over statistics blocks), largest first,
    against the pseudo-task null (its median's mean and 95% band) and both chances (evidence.overlap_evidence)."""
    names, pairs, ci = evidence["names"], np.asarray(evidence["pairs"]), np.asarray(evidence["pairs_ci"])
    i, j = np.triu_indices(len(names), k=1)
    order = np.argsort(-pairs, kind="stable")[:top]
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(order) + 1.8))
    y = np.arange(len(order))
    null = evidence.get("null_label", "pseudo-task null")      # retain general: layer-matched chance
    ax.axvspan(*evidence["null_band"], color="0.85", label=f"{null}: 95% of medians")
    ax.axvline(evidence["null_median"], color="0.4", lw=1, label=f"{null} (median)")
    ax.axvline(evidence["uniform_chance"], color="k", ls="--", lw=1, label="uniform chance")
    ax.axvline(evidence["layer_matched_chance"], color="k", ls=":", lw=1, label="layer-matched chance")
    ax.errorbar(pairs[order], y, xerr=np.clip(np.stack([pairs[order] - ci[order, 0], ci[order, 1] - pairs[order]]), 0, None),
                fmt="o", ms=3, color="tab:purple", elinewidth=1, label="pair (95% interval)")
    ax.set_yticks(y, [f"{names[i[k]]} · {names[j[k]]}" for k in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel("overlap coefficient of the top sets")
    ax.set_title(f"Pairwise overlap over {what}" + (f" (the {top} largest)" if len(pairs) > top else ""))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


@_figure
def layer_distribution(masks: dict, *, title: str):
    """Share of each task's selected neurons in each layer."""
    return layer_lines({t: ov.layer_distribution(m) for t, m in masks.items()}, title=title,
                       ylabel="share of selected neurons")


@_figure
def grouped_bars(groups: dict, *, title: str, ylabel: str):
    """Bars grouped by key: groups = {group: {bar name: value}}, the same bar names in every group."""
    names = list(next(iter(groups.values())))
    x = np.arange(len(groups))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) + 2), 4))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [g[name] for g in groups.values()], width, label=name)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


@_figure
def claims(claim_list):
    """Each claim's estimate with its 95% interval against its null (a forest plot): supported claims in colour."""
    fig, ax = plt.subplots(figsize=(7, 0.7 * len(claim_list) + 1.5))
    for i, c in enumerate(claim_list):
        color = "tab:green" if c.supported else "tab:gray"
        ax.plot(c.ci, [i, i], color=color, lw=3)
        ax.plot([c.estimate], [i], "o", color=color)
        ax.plot([c.null, c.null], [i - 0.35, i + 0.35], "k--", lw=1)
    ax.set_yticks(range(len(claim_list)), [f"{c.id}{'' if c.supported else ' (not supported)'}" for c in claim_list])
    ax.set_ylim(-0.7, len(claim_list) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel("estimate (excess over the null) with its 95% interval")
    ax.set_title("Claims of this notebook")
    ax.grid(alpha=0.3, axis="x")
    text_only(fig).tight_layout()         # laid out: its texts measured, so set first
    return fig


def interactive() -> bool:
    """True in JupyterLab; False in headless runs (the runner sets MODSEP_HEADLESS)."""
    return not os.environ.get("MODSEP_HEADLESS")


# Explorer figures are drawn on comm messages, which JupyterLab 4.6 with ipykernel 7 may handle on a subshell thread
# while the inline backend flushes pyplot's figures on another: one figure rendered by two threads at once came out
# blank. So an explorer draws on a Figure that pyplot does not track, renders it once itself, and shows the PNG.
def untracked_figure(**kwargs):
    """A matplotlib Figure unknown to pyplot (no backend shows, flushes or closes it); kwargs go to Figure."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def png_bytes(fig, dpi: int = 100) -> bytes:
    """`fig` rendered as PNG, cropped to what is drawn (as the inline backend does)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def show_png(fig) -> None:
    """Display `fig` as a PNG rendered here (inside an Output widget's `with`: into that widget)."""
    from IPython.display import Image, display
    display(Image(data=png_bytes(fig), format="png"))


def score_explorer(scores: dict, n_layers: int):
    """An ipywidgets explorer (JupyterLab): pick a task, a layer and a fraction to see that layer's score
    distribution and the per-layer selection threshold. Returns None in headless runs."""
    if not interactive():
        print("headless run: explorer skipped")
        return None
    import ipywidgets as w

    tasks = list(scores)

    def explore(task=tasks[0], layer=0, frac=0.01):
        s = scores[task][layer].double().numpy()
        chosen = select_neurons(scores[task], frac, "per_layer")[layer].numpy()
        fig = untracked_figure(figsize=(6, 3))
        ax = fig.subplots()
        ax.hist(np.log10(s + 1e-12), bins=60)
        ax.axvline(np.log10(s[chosen].min() + 1e-12), color="r", label=f"top {frac:.1%} in this layer")
        ax.set_xlabel("log10 score")
        ax.set_ylabel("neurons")
        ax.set_title(f"{task}, layer {layer}")
        ax.legend()
        show_png(text_only(fig))
    return w.interact(explore, task=tasks, layer=(0, n_layers - 1), frac=(0.001, 0.2, 0.001))
