"""``numprune export``: a saved model folder as one GGUF file for llama.cpp (and Ollama, LM Studio, ...)."""

from __future__ import annotations

from numprune.export.gguf import OUTTYPES, export_gguf
from numprune.models import registry_folder

DEFAULT_OUTTYPE = "f16"


def add_parser(commands) -> None:
    p = commands.add_parser("export", help="write a model folder as a GGUF file that llama.cpp runs")
    p.add_argument("--model", required=True, help="a saved model folder (pruned or dense), or 'smollm2'")
    add_gguf_options(p, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file")
    p.set_defaults(run=run)


def add_gguf_options(p, required: bool) -> None:
    p.add_argument("--gguf", required=required, default=None, help="GGUF file to write (atomically); per-layer "
                   "widths use llama.cpp's deci architecture, uniform ones its llama architecture")
    p.add_argument("--outtype", choices=tuple(OUTTYPES), default=None, help=f"tensor type of the GGUF's matrices "
                   f"(default {DEFAULT_OUTTYPE}; q8_0 keeps matrices whose rows are not a multiple of 32 in f16)")


def gguf_outtype(args) -> str:
    """--outtype, or the default (unset by default, so that prune can tell --outtype without --gguf)."""
    return args.outtype or DEFAULT_OUTTYPE


def run(args) -> int:
    result = export_gguf(registry_folder(args.model) or args.model, args.gguf, gguf_outtype(args),
                         overwrite=args.overwrite)
    print_export(result)
    return 0


def print_export(result) -> None:
    fallback = f"; {len(result.f16_fallback)} matrices kept in f16 (rows not a multiple of the block)" \
        if result.f16_fallback else ""
    print(f"gguf: {result.path} ({result.bytes / 2**20:.1f} MiB, llama.cpp architecture {result.architecture}, "
          f"{result.outtype}, tokenizer {result.tokenizer}{fallback})")
