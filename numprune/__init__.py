"""numprune: numerical structured pruning of autoregressive transformers.

Importing numprune registers its per-layer model classes with transformers' Auto classes, so
pruned folders with different widths per layer load with ``AutoModelForCausalLM.from_pretrained``.
"""

from numprune import modeling  # noqa: F401  (registers the Auto classes)
from numprune.api import PruneOptions, calibrate, prune
from numprune.errors import NumpruneError
from numprune.save import save_pruned
from numprune.stream import prune_streaming

__version__ = "0.1.0"
__all__ = ["NumpruneError", "PruneOptions", "calibrate", "prune", "prune_streaming", "save_pruned", "__version__"]
