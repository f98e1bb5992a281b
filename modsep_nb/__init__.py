"""modsep_nb: how modular are transformers? Task-specific MLP neurons, their overlap, random-init controls,
MoEfication and layerwise correspondence. The public API is docs/method.md §11; notebooks import it from here."""
import logging as _logging

# torch.compile imports torch.utils.cpp_extension, which on a machine with a CUDA toolkit but no GPU logs "No CUDA
# runtime is found, using CUDA_HOME=..." (a red stderr box in every executed notebook); nothing here needs CUDA_HOME
_logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found"))

from .evaluation import cross_task_matrix, evaluate
from .models import ARCHITECTURES, Architecture, ModelHandle, load_model
from .moefication import balanced_kmeans
from .overlaps import overlap
from .pruning import ablate, iterative_prune, prune_scores, select_neurons, task_scores
from .statistics import NeuronStats, collect_stats

__all__ = ["ARCHITECTURES", "Architecture", "ModelHandle", "load_model", "NeuronStats", "collect_stats",
           "ablate", "iterative_prune", "prune_scores", "select_neurons", "cross_task_matrix", "evaluate",
           "task_scores", "overlap", "balanced_kmeans"]
