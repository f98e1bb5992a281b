"""A run's report for reading without running anything: `write_index(run_dir)` writes run_dir/index.html.

The page holds the summary of findings (summary.md, or else each notebook's findings/*.md, rendered from
Markdown), every figure in figures/, links to each executed notebook rendered to HTML with nbconvert
(html/<name>.html, images embedded) and to the pages of neurons to look at (neurons/*.html). Every link is
relative and nothing is fetched from the network, so the folder can be zipped and sent.
"""
from __future__ import annotations

import html
import json
import re
import warnings
from pathlib import Path
from urllib.parse import quote, unquote

from .files import write_text_atomic
from .scorecard import scorecard_markdown

# nbconvert's lab template, less the scripts it loads from CDNs (require.js, MathJax, mermaid, the widget
# manager): offline they only fail to load. Without MathJax, TeX in Markdown cells shows as written.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
"""

_CSS = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
img{max-width:100%;height:auto}figure{margin:1.5rem 0}figcaption{color:#555;font-size:.9rem}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem}
code{background:#f4f4f4;padding:0 .2rem}"""

_LINKED = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def notebook_html(notebook: Path, out: Path) -> Path:
    """Render an executed notebook to a self-contained HTML file (output images embedded)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="modsep_offline.html.j2", embed_images=True,
                            extra_loaders=[jinja2.DictLoader({"modsep_offline.html.j2": _OFFLINE_TEMPLATE})])
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4),
                                          resources={"metadata": {"path": str(notebook.parent)}})
    write_text_atomic(out, body)
    return out


def is_local(url: str) -> bool:
    """A relative link inside the folder: no scheme (http:, data:), no host (//h; a browser reads a backslash as
    /), no absolute path, no white space (a browser drops tabs and newlines from a URL: "ht<tab>tp:" is http:)."""
    return bool(url) and not url.startswith("/") and not re.search(r"[:\\\s\x00-\x1f]", url)


def markdown_html(text: str) -> str:
    """Markdown (with tables) to HTML; raw HTML in the text is escaped, not passed through, and an image or a
    link that leaves the folder (say a task named "![x](http://host/x.png)") is shown as its text: the page
    fetches nothing and points nowhere outside the folder."""
    import mistune
    from mistune.util import striptags

    class Offline(mistune.HTMLRenderer):
        def image(self, text, url, title=None):
            if is_local(url):
                return super().image(text, url, title)
            return f"{striptags(text)} (remote image, not shown)"      # text: already escaped HTML

        def link(self, text, url, title=None):
            return super().link(text, url, title) if is_local(url) else text
    return mistune.create_markdown(escape=True, renderer=Offline(escape=True),
                                   plugins=["table", "strikethrough"])(text)


def local_links(page: str) -> list[str]:
    """The relative src/href targets of an HTML page (anchors, data: URIs and absolute URLs left out)."""
    targets = [unquote(html.unescape(t).split("#")[0].split("?")[0]) for t in _LINKED.findall(page)]
    return [t for t in targets if t and ":" not in t and not t.startswith("/")]


def _finished(folder: Path, pattern: str) -> list[Path]:
    """The files of `folder` matching `pattern`, sorted, without hidden ones (files still being written)."""
    return [p for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")]


def _summary_markdown(run_dir: Path) -> str:
    summary = run_dir / "summary.md"
    if summary.is_file():
        return summary.read_text(encoding="utf-8")
    findings = _finished(run_dir / "findings", "*.md")
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in findings) or "_No findings were recorded in this run._"
    return scorecard_markdown(run_dir) + "\n" + text           # the scorecard first, as summary.md has it


def _run_title(run_dir: Path) -> str:
    params = run_dir / "params.json"
    if params.is_file():
        name = json.loads(params.read_text(encoding="utf-8")).get("run_name")
        if name:
            return f"modsep run {name}"
    return f"modsep run {run_dir.name}"


def write_index(run_dir) -> Path:
    """Write run_dir/index.html (and run_dir/html/<notebook>.html for every executed notebook); returns
    the page's path. A link in the findings that points to a missing file is reported with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: pass the folder a run wrote "
                                "(outputs/<run_name>)")
    title = html.escape(_run_title(run_dir))
    summary = markdown_html(_summary_markdown(run_dir))
    lead = re.match(r"\s*<h1[^>]*>(.*?)</h1>", summary, re.DOTALL)      # summary.md's own title heads the page
    heading, summary = (lead.group(1), summary[lead.end():]) if lead else (title, summary)
    shown = set(local_links(summary))
    figures = [f"figures/{p.name}" for p in _finished(run_dir / "figures", "*.png")]
    others = [f for f in figures if f not in shown]           # every figure appears once on the page

    notebooks = []
    for nb in _finished(run_dir, "*.ipynb"):
        stem = nb.name[:-len(".ipynb")]
        notebook_html(nb, run_dir / "html" / f"{stem}.html")
        state = " (failed: read its traceback)" if stem.endswith(".failed") else ""
        notebooks.append(f'<li><a href="html/{quote(stem)}.html">{html.escape(stem)}</a>{state} '
                         f'(<a href="{quote(nb.name)}">.ipynb</a>)</li>')
    neurons = [f'<li><a href="{quote(p.relative_to(run_dir).as_posix())}">{html.escape(p.stem)}</a></li>'
               for p in _finished(run_dir / "neurons", "*.html")]
    data = [p.relative_to(run_dir).as_posix() for p in [run_dir / "params.json",
                                                        *_finished(run_dir / "statistics", "*.json")]
            if p.is_file()]

    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>",
             f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n<h1>{heading}</h1>",
             '<p><a href="#findings">Findings</a> · <a href="#figures">Figures</a> · '
             '<a href="#notebooks">Notebooks</a> · ' + ('<a href="#neurons">Neurons</a> · ' if neurons else "") +
             '<a href="#data">Numbers</a></p>',
             f'<section id="findings">\n{summary}\n</section>',
             '<section id="figures">\n<h2>Figures</h2>',
             "<p>Every figure of the run; those in the findings above are not repeated.</p>" if shown else ""]
    parts += [f'<figure><img src="{quote(f)}" alt="{html.escape(Path(f).stem)}">'
              f"<figcaption>{html.escape(Path(f).name)}</figcaption></figure>" for f in others]
    parts += ["</section>", '<section id="notebooks">\n<h2>Executed notebooks</h2>',
              "<ul>\n" + "\n".join(notebooks) + "\n</ul>" if notebooks else "<p>No executed notebooks.</p>",
              "</section>",
              ('<section id="neurons">\n<h2>Neurons you can look at</h2>\n<p>Per task, its top selected neurons: '
               "the inputs that activate them most and their activation on every task.</p>\n<ul>\n"
               + "\n".join(neurons) + "\n</ul>\n</section>") if neurons else "",
              '<section id="data">\n<h2>Numbers</h2>\n<ul>',
              *[f'<li><a href="{quote(d)}">{html.escape(d)}</a></li>' for d in data],
              "</ul>\n</section>\n</body>\n</html>\n"]
    page = "\n".join(p for p in parts if p)
    missing = sorted({t for t in local_links(page) if not (run_dir / t).is_file()})
    if missing:
        warnings.warn(f"{run_dir / 'index.html'} links to missing files: {', '.join(missing)}", stacklevel=2)
    out = run_dir / "index.html"
    write_text_atomic(out, page)
    return out
