"""Neurons you can look at: for a few chosen neurons, the inputs that activate them most (tokens in context
for a language model, patches over the image for a ViT) and their activation distribution on every task.

One more pass over each task's statistics data, reading only the chosen neurons: per (neuron, task) a running
top-k of the counted positions (of the images, each at its best token, for a ViT; ties broken by position: the
earlier wins), each kept with its context, and a histogram with fixed bins. Memory is O(neurons x tasks x k), whatever the amount of data.

    shown = study.neuron_examples(masks, scores=scores)     # pick_neurons + collect_examples
    neurons.export(shown, out_dir)                          # neurons/<kind>-<task>.html and PNGs
    neurons.explorer(shown);                                # ipywidgets in JupyterLab, shown; None headless

Per neuron the pages also show what it does: its direct effect on the outputs (direct_effects: its output
direction read through the final norm's weight and the unembedding or classifier head) and, for the top
neurons of each task, its ablation effect (ablation_effects: each task's accuracy with that neuron zeroed).
"""
# The public face: what is computed lives in neuron_collection, what is shown in neuron_pages (which imports the
# collection, never the reverse); every public name stays importable from here.
from .neuron_collection import (DIRECT_CAPTION, RANKS, ExampleCollector, NeuronExamples, ablation_effects,
                                add_ablations, collect_examples, direct_effects, histogram_edges, output_names,
                                pick_neurons)
from .neuron_pages import (ablation_html, context_html, contexts_html, direct_html, distribution_figure, explorer,
                           export, images_figure, top_rows)

__all__ = ["DIRECT_CAPTION", "RANKS", "ExampleCollector", "NeuronExamples", "ablation_effects", "ablation_html",
           "add_ablations", "collect_examples", "context_html", "contexts_html", "direct_effects", "direct_html",
           "distribution_figure", "explorer", "export", "histogram_edges", "images_figure", "output_names",
           "pick_neurons", "top_rows"]
