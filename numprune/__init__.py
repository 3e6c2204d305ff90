"""numprune: numerical structured pruning of autoregressive transformers.

Importing numprune registers every family (numprune/families/) and its per-layer model classes with
transformers' Auto classes, so pruned folders with different widths per layer load with
``AutoModelForCausalLM.from_pretrained``.
"""

import os
import sys

INTERRUPTED_AT_START = "numprune: interrupted while starting; nothing was written"


def _run_as_module() -> bool:
    """Whether this process is ``python -m numprune``."""
    argv = getattr(sys, "orig_argv", sys.argv)
    return any(flag == "-m" and name == "numprune" for flag, name in zip(argv, argv[1:]))


# `python -m numprune` puts the current folder first on the import path, so a model folder holding, say,
# safetensors.py would have its code run by the imports below. The command never needs that folder there.
if _run_as_module() and sys.path and sys.path[0] == os.getcwd():
    del sys.path[0]


def exit_if_command_interrupted() -> None:
    """Ctrl-C while the command line is still importing torch and transformers: one line and status 130,
    not a traceback. Only when this process is the ``numprune`` command; an importing program gets the
    KeyboardInterrupt as usual."""
    if _run_as_module() or sys.argv[0].rsplit("/", 1)[-1] == "numprune":
        print(INTERRUPTED_AT_START, file=sys.stderr)
        raise SystemExit(130)


try:
    from numprune import families  # noqa: F401  (registers every family's adapter and Auto classes)
    from numprune.api import calibrate, prune
    from numprune.errors import NumpruneError
    from numprune.heal import heal
    from numprune.recipe import PruneOptions
    from numprune.save import save_pruned
    from numprune.stream import heal_streaming, prune_streaming
    from numprune.version import VERSION as __version__
except KeyboardInterrupt:
    exit_if_command_interrupted()
    raise

__all__ = ["NumpruneError", "PruneOptions", "calibrate", "heal", "heal_streaming", "prune", "prune_streaming", "save_pruned",
           "__version__"]
