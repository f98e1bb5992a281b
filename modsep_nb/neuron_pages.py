"""Neurons you can look at, what is shown: HTML pages (export), the JupyterLab explorer widget (explorer) and
their parts (contexts, direct and ablation tables, distribution and image figures) for a NeuronExamples that
neuron_collection.py computed. Imports the collection, never the reverse; neurons.py re-exports both.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from urllib.parse import quote

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatter
import torch

from .files import atomic_file, file_name, write_text_atomic
from .neuron_collection import NeuronExamples
from .plots import interactive, show_png, text_only, untracked_figure

_POSITIVE, _NEGATIVE = (214, 39, 40), (31, 119, 180)
# what the pages call things, per modality (NeuronExamples.kind, the model's: "lm" or "image")
_WORDS = {"lm": {"output": "token", "evaluated": "documents", "position": "token",
                "shown": ", with {window} tokens either side (red positive, blue negative)."},
         "image": {"output": "class", "evaluated": "images", "position": "token (CLS or patch)",
                   "shown": ", the neuron's activation drawn over every patch (red positive, blue negative)."}}
_TOKEN_CSS = """.ex{font-family:ui-monospace,monospace;font-size:.85rem;margin:.15rem 0;white-space:pre-wrap}
.ex .tok{border-radius:2px}.ex .hit{outline:2px solid #000}
.ex .meta{color:#555;font-family:system-ui,sans-serif;font-size:.8rem;margin-right:.5rem}
.effects{border-collapse:collapse;font-size:.85rem;margin:.3rem 0}.effects td,.effects th{padding:.1rem .6rem;
text-align:left}.effects .num{text-align:right;font-variant-numeric:tabular-nums}
.effects .tk{font-family:ui-monospace,monospace}.caption{color:#555;font-size:.85rem;font-style:italic}"""
_PAGE_CSS = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
img{max-width:100%;height:auto}section{margin-bottom:2.5rem}
""" + _TOKEN_CSS


def _scale(ex: NeuronExamples, neuron) -> float:
    """The largest |activation| kept for `neuron` on any task: the colour scale of its views."""
    i = ex.index(neuron)
    values = torch.cat([ex.value[t][i] for t in ex.tasks])
    values = values[~torch.isnan(values)].abs()
    return float(values.max()) if len(values) and float(values.max()) > 0 else 1.0


def _colour(value: float, scale: float) -> str:
    if not math.isfinite(value):
        return "transparent"
    r, g, b = _POSITIVE if value >= 0 else _NEGATIVE
    return f"rgba({r},{g},{b},{min(1.0, abs(value) / scale):.3f})"


def _shown(token: str) -> str:
    """A token as text a reader can see: line breaks and tabs as symbols, nothing as ∅; HTML-escaped."""
    visible = token.replace("\r", "").replace("\n", "↵").replace("\t", "→") or "∅"
    return html.escape(visible, quote=True)


def context_html(row: dict, scale: float, window: int) -> str:
    """One kept position as a line of tokens, each on a background coloured by this neuron's activation there
    (red positive, blue negative, full colour at `scale`); the kept token outlined; values in tooltips."""
    spans = []
    for j, (token, value) in enumerate(zip(row["tokens"], row["context"])):
        if token is None:
            continue
        hit = " hit" if j == window else ""
        spans.append(f'<span class="tok{hit}" style="background:{_colour(float(value), scale)}" '
                     f'title="{float(value):+.3f}">{_shown(token)}</span>')
    name = row.get("name", f"doc {row['document']}")        # as tasks.json names it
    meta = html.escape(f"{row['task']} · {name} · {row['value']:+.3f}")
    return f'<div class="ex"><span class="meta">{meta}</span>{"".join(spans)}</div>'


def contexts_html(ex: NeuronExamples, neuron, tasks=None, limit: int | None = None) -> str:
    """The kept contexts of `neuron` on `tasks` (default all), best first, as HTML lines (LM only)."""
    if not ex.shows_tokens:
        raise TypeError("contexts_html shows tokens; for an image model use images_figure")
    scale = _scale(ex, neuron)
    rows = ex.examples(neuron, tasks, limit)
    return "\n".join(context_html(r, scale, ex.window) for r in rows) or "<p>No positions kept.</p>"


def direct_html(ex: NeuronExamples, neuron) -> str:
    """The neuron's direct effect (direct_effects) as a section: its caption, then the outputs it pushes up and
    down most side by side, with their logit change per unit of activation."""
    head = '<h3>Direct effect on the outputs</h3>\n<p class="caption">' + html.escape(ex.direct_note) + "</p>"
    effects = ex.direct.get(tuple(neuron))
    if effects is None:
        return head
    unit = _WORDS[ex.kind]["output"]
    rows = [f"<tr><th>pushes up ({unit})</th><th>logit</th><th>pushes down ({unit})</th><th>logit</th></tr>"]
    for (up, u), (down, d) in zip(effects["up"], effects["down"]):
        rows.append(f'<tr><td class="tk">{_shown(up)}</td><td class="num">{u:+.3f}</td>'
                    f'<td class="tk">{_shown(down)}</td><td class="num">{d:+.3f}</td></tr>')
    return head + '\n<table class="effects direct">' + "".join(rows) + "</table>"


def ablation_html(ex: NeuronExamples, neuron) -> str:
    """The neuron's ablation effect (ablation_effects) as a section: per task its intact top-1 accuracy and the
    change with this neuron zeroed, with the interval; '' when no ablation was run."""
    if not ex.ablation_note:
        return ""
    head = '<h3>Ablation effect</h3>\n<p class="caption">' + html.escape(ex.ablation_note) + "</p>"
    effects = ex.ablation.get(tuple(neuron))
    if effects is None:
        return head + "\n<p>Not ablated: only the top neurons of each task's set are.</p>"
    owners = set(ex.owners(neuron))
    rows = [f"<tr><th>task</th><th>{_WORDS[ex.kind]['evaluated']}</th><th>top-1 intact</th>"
            "<th>change when zeroed</th><th>95% interval</th></tr>"]
    for task, e in effects.items():
        name = f"<b>{html.escape(task)}</b>" if task in owners else html.escape(task)
        rows.append(f'<tr><td>{name}</td><td class="num">{e["n"]}</td><td class="num">{e["base"]:.3f}</td>'
                    f'<td class="num">{e["delta"]:+.4f}</td>'
                    f'<td class="num">[{e["ci"][0]:+.4f}, {e["ci"][1]:+.4f}]</td></tr>')
    return head + '\n<table class="effects ablation">' + "".join(rows) + "</table>"


def distribution_figure(ex: NeuronExamples, neuron):
    """The neuron's activation density on every task (log scale, over the range where any task has values);
    the tasks it was picked for drawn thick."""
    i = ex.index(neuron)
    edges = ex.edges[i].numpy()
    owners = set(ex.owners(neuron))
    occupied = np.zeros(len(edges) - 1, dtype=bool)
    fig = untracked_figure(figsize=(7, 3.6))     # pyplot-free: the explorer draws it on a widget thread
    ax = fig.subplots()
    for task in ex.tasks:
        counts = ex.hist[task][i].numpy().astype(float)
        total = counts.sum()
        if total == 0:
            continue
        occupied |= counts[1:-1] > 0
        outside = (counts[0] + counts[-1]) / total
        label = task + (f" ({outside:.1%} beyond the bins)" if outside > 0 else "")
        ax.stairs(counts[1:-1] / total / np.diff(edges), edges, lw=2.5 if task in owners else 1.0, label=label,
                  alpha=1.0 if task in owners else 0.7)
    if occupied.any():
        first, last = np.flatnonzero(occupied)[[0, -1]]
        pad = 0.03 * (edges[last + 1] - edges[first])
        ax.set_xlim(edges[first] - pad, edges[last + 1] + pad)
    ax.set_yscale("log")
    # plain tick labels: log axes label in mathtext, which text_only would show raw ("$\mathdefault{10^{1}}$")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("activation")
    ax.set_ylabel("density (fraction of positions\nper unit activation)")
    ax.set_title(f"Layer {neuron[0]}, neuron {neuron[1]}: activation on each task"
                 + (f" (picked for {', '.join(sorted(owners))})" if owners else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return text_only(fig)   # no tight_layout: one axes, and saving and inline display both crop to the drawn extent


def _image_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised image [C, H, W] scaled to [0, 1] for display (grey for one channel)."""
    x = image.float()
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def images_figure(ex: NeuronExamples, neuron, rows: dict):
    """Kept images of `neuron` with its activation at every patch over each image (red positive, blue
    negative, full colour at the neuron's largest kept |activation|); the kept patch outlined (or "CLS").
    rows: {row title: examples} (NeuronExamples.examples)."""
    if ex.shows_tokens:
        raise TypeError("images_figure shows images; for a language model use contexts_html")
    from matplotlib.patches import Rectangle
    prefix, n_rows, n_cols = ex.grid_shape
    scale = _scale(ex, neuron)
    width = max(1, max(len(r) for r in rows.values()))
    fig = untracked_figure(figsize=(1.7 * width, 2.3 * len(rows)))      # pyplot-free, as distribution_figure
    axes = fig.subplots(len(rows), width, squeeze=False)
    # a fixed grid without axis decorations: laying out (tight_layout) a grid of framed axes cost ~0.5 s a figure
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.02, top=1 - 0.35 / len(rows), wspace=0.1, hspace=0.45)
    for r, (title, examples) in enumerate(rows.items()):
        axes[r, 0].text(-0.08, 0.5, title, rotation=90, ha="right", va="center", fontsize=8,
                        transform=axes[r, 0].transAxes)
        for c in range(width):
            ax = axes[r, c]
            ax.set_axis_off()
            ax.xaxis.set_visible(False)      # else every draw still measures the (empty) axes' ticks
            ax.yaxis.set_visible(False)
            if c >= len(examples):
                continue
            e = examples[c]
            picture = _image_rgb(e["image"])
            h, w = picture.shape[:2]
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, extent=(0, w, h, 0))
            grid = e["grid"][prefix:].reshape(n_rows, n_cols)
            overlay = plt.get_cmap("RdBu_r")((grid / scale + 1) / 2)
            overlay[..., 3] = 0.8 * np.clip(np.abs(grid) / scale, 0, 1)    # quiet patches leave the image visible
            ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
            where = "CLS" if e["position"] < prefix else ""
            if not where:
                p = e["position"] - prefix
                ph, pw = h / n_rows, w / n_cols
                ax.add_patch(Rectangle(((p % n_cols) * pw, (p // n_cols) * ph), pw, ph, fill=False, lw=1.5,
                                       edgecolor="black"))
            ax.set_title(f"{e['task']} {e.get('name', '#' + str(e['document']))}\n{e['value']:+.2f} {where}".strip(),
                         fontsize=7)
    fig.suptitle(f"Layer {neuron[0]}, neuron {neuron[1]}: top images (activation per patch)", fontsize=9)
    return text_only(fig)


def top_rows(ex: NeuronExamples, neuron, task: str) -> dict:
    """{title: examples}: the top k on `task`, and the top k on every other task together."""
    others = [t for t in ex.tasks if t != task]
    rows = {f"top on {task}": ex.examples(neuron, [task], ex.k)}
    if others:
        rows["top on the other tasks"] = ex.examples(neuron, others, ex.k)
    return rows


def _save_png(fig, path: Path) -> Path:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return path


def export(ex: NeuronExamples, out_dir, kind: str | None = None) -> list[Path]:
    """Write out_dir/neurons/<kind>-<task>.html for every task with picked neurons, and the PNGs they show
    (out_dir/neurons/<kind>/...: each neuron's distribution, for images its top images per task); every link
    relative. kind: the file-name prefix (default "lm" or "image"); <task> is files.file_name(task), one file per
    task whatever its name. Returns the HTML pages' paths."""
    kind = kind or ex.kind
    folder = Path(out_dir) / "neurons"
    assets = folder / file_name(kind)
    assets.mkdir(parents=True, exist_ok=True)
    distribution = {}
    for neuron in ex.neurons:
        name = f"L{neuron[0]}-N{neuron[1]}-distribution.png"
        _save_png(distribution_figure(ex, neuron), assets / name)
        distribution[neuron] = f"{file_name(kind)}/{name}"
    pages = []
    for task, neurons in ex.picked.items():
        sections = []
        for rank_in_task, neuron in enumerate(neurons, 1):
            l, u = neuron
            parts = [f'<section id="L{l}-N{u}">\n<h2>{rank_in_task}. Layer {l}, neuron {u}</h2>',
                     f"<p>Picked for: {html.escape(', '.join(ex.owners(neuron)))}.</p>",
                     direct_html(ex, neuron), ablation_html(ex, neuron),      # what it does, before where it fires
                     f'<img src="{quote(distribution[neuron])}" alt="activation distribution of layer {l}, '
                     f'neuron {u}">']
            if ex.shows_tokens:
                for title, rows in top_rows(ex, neuron, task).items():
                    scale = _scale(ex, neuron)
                    lines = "\n".join(context_html(r, scale, ex.window) for r in rows) or "<p>None kept.</p>"
                    parts.append(f"<h3>{html.escape(title.capitalize())}</h3>\n{lines}")
            else:
                name = f"L{l}-N{u}-{file_name(task)}-top.png"
                _save_png(images_figure(ex, neuron, top_rows(ex, neuron, task)), assets / name)
                parts.append(f'<img src="{quote(file_name(kind) + "/" + name)}" alt="top images of layer {l}, '
                             f'neuron {u}">')
            sections.append("\n".join(parts) + "\n</section>")
        toc = " · ".join(f'<a href="#L{l}-N{u}">L{l} N{u}</a>' for l, u in neurons)
        unit = _WORDS[ex.kind]["position"]
        page = "\n".join([
            f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Neurons of {html.escape(task)}</title>\n<style>\n{_PAGE_CSS}\n</style>\n</head>\n<body>",
            f"<h1>Neurons of {html.escape(task)}</h1>",
            f"<p>{html.escape(ex.model)}: the {len(neurons)} selected neurons of this task with the highest "
            f"scores. For each, what it does (its direct effect on the outputs"
            f"{', and how each task’s accuracy changes with it zeroed' if ex.ablation_note else ''}), "
            f"its activation distribution on every task's statistics data, and the {ex.k} "
            f"{unit} positions where its |activation| is largest{' ' if ex.rank == 'abs' else ' (signed) '}on "
            f"this task and on the other tasks"
            + _WORDS[ex.kind]["shown"].format(window=ex.window) + "</p>",
            f"<p>{toc}</p>", *sections, "</body>\n</html>\n"])
        path = folder / f"{file_name(kind)}-{file_name(task)}.html"
        write_text_atomic(path, page)
        pages.append(path)
    return pages


def explorer(ex: NeuronExamples):
    """An ipywidgets explorer (JupyterLab): pick a task, then a layer and a neuron among those shown for it,
    to see its direct and ablation effects, its top contexts (images) and its distribution on every task.
    It displays itself and returns its
    box (end the line with `;`, or the box is shown a second time); None in headless runs."""
    if not interactive():
        print("headless run: neuron explorer skipped (the same views are in neurons/*.html)")
        return None
    import ipywidgets as w
    from IPython.display import HTML, display

    tasks = [t for t, ns in ex.picked.items() if ns]
    task = w.Dropdown(options=tasks, description="task")
    layer = w.Dropdown(description="layer")
    neuron = w.Dropdown(description="neuron")
    out = w.Output()

    def choices(dropdown, options):
        dropdown.options = options
        if dropdown.value not in options:
            dropdown.value = options[0] if options else None

    def layers_of():
        choices(layer, sorted({l for l, _ in ex.picked[task.value]}))

    def neurons_of():
        choices(neuron, [u for l, u in ex.picked[task.value] if l == layer.value])

    def draw(change=None):
        out.clear_output(wait=True)
        if layer.value is None or neuron.value is None:
            return
        chosen = (layer.value, neuron.value)
        with out:
            display(HTML(f"<style>{_TOKEN_CSS}</style>" + direct_html(ex, chosen) + ablation_html(ex, chosen)))
            rows = top_rows(ex, chosen, task.value)
            if ex.shows_tokens:
                scale = _scale(ex, chosen)
                display(HTML(f"<style>{_TOKEN_CSS}</style>" + "".join(
                    f"<h4>{html.escape(title)}</h4>" + "".join(context_html(r, scale, ex.window) for r in rs)
                    for title, rs in rows.items())))
            else:
                show_png(images_figure(ex, chosen, rows))
            show_png(distribution_figure(ex, chosen))

    following = []       # non-empty while one control's change sets the others: they must not draw too

    def follow(update):
        def handler(change):
            if following:
                return
            following.append(change)
            try:
                update()
            finally:
                following.clear()
            draw()                    # once per person's change (a task change moved all three: 3 draws)
        return handler

    task.observe(follow(lambda: (layers_of(), neurons_of())), names="value")
    layer.observe(follow(neurons_of), names="value")
    neuron.observe(follow(lambda: None), names="value")
    following.append(None)
    layers_of()
    neurons_of()
    following.clear()
    draw()
    box = w.VBox([w.HBox([task, layer, neuron]), out])
    display(box)         # shown by itself, as plots.score_explorer: `explorer(shown);` (the notebooks' line) hid it
    return box
