"""Writing numprune's results in formats other runtimes load (GGUF for llama.cpp)."""

from numprune.export.gguf import GgufExport, export_gguf

__all__ = ["GgufExport", "export_gguf"]
