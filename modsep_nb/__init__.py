"""modsep_nb: how modular are transformers? Task-specific MLP neurons, their overlap, random-init controls,
MoEfication and layerwise correspondence. The public API is SPEC §11; notebooks import it from here."""
from .evaluation import cross_task_matrix, evaluate
from .models import ARCHITECTURES, Architecture, ModelHandle, load_model
from .moefication import balanced_kmeans
from .overlaps import overlap
from .pruning import ablate, iterative_prune, prune_scores, select_neurons, task_scores
from .statistics import NeuronStats, collect_stats

__all__ = ["ARCHITECTURES", "Architecture", "ModelHandle", "load_model", "NeuronStats", "collect_stats",
           "ablate", "iterative_prune", "prune_scores", "select_neurons", "cross_task_matrix", "evaluate",
           "task_scores", "overlap", "balanced_kmeans"]
