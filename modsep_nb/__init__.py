"""modsep_nb: how modular are transformers? Task-specific MLP neurons, their overlap, random-init controls,
MoEfication and layerwise correspondence. The public API is SPEC §11; notebooks import it from here."""
from . import overlap  # callable: modsep_nb.overlap(mask_a, mask_b, ...) and the module of overlap tools
from .evaluation import cross_task_matrix, evaluate, task_scores
from .models import ARCHITECTURES, Architecture, ModelHandle, load_model
from .moefication import balanced_kmeans
from .pruning import ablate, iterative_prune, prune_scores, select_neurons
from .statistics import NeuronStats, collect_stats

__all__ = ["ARCHITECTURES", "Architecture", "ModelHandle", "load_model", "NeuronStats", "collect_stats",
           "ablate", "iterative_prune", "prune_scores", "select_neurons", "cross_task_matrix", "evaluate",
           "task_scores", "overlap", "balanced_kmeans"]
