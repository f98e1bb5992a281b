"""modsep_nb: how modular are transformers? Task-specific MLP neurons, their overlap, random-init controls,
MoEfication and layerwise correspondence. The public API is SPEC §11; notebooks import it from here."""
from .models import ARCHITECTURES, Architecture, ModelHandle, load_model
from .statistics import NeuronStats, collect_stats
from .pruning import ablate, prune_scores, select_neurons
from .evaluation import cross_task_matrix, evaluate, task_scores

__all__ = ["ARCHITECTURES", "Architecture", "ModelHandle", "load_model", "NeuronStats", "collect_stats",
           "ablate", "prune_scores", "select_neurons", "cross_task_matrix", "evaluate", "task_scores"]


def __getattr__(name):
    # modules written alongside (overlap, MoEfication) are imported lazily so a missing optional
    # dependency (pymetis) only matters to code that uses it
    if name == "overlap":
        from .overlap import overlap
        return overlap
    if name == "balanced_kmeans":
        from .moefication import balanced_kmeans
        return balanced_kmeans
    raise AttributeError(f"module 'modsep_nb' has no attribute {name!r}")
