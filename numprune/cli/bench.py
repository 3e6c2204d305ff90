"""``numprune bench``: prefill/decode speed and memory of dense and pruned models."""

from __future__ import annotations

import json
import tempfile

import torch

from numprune import bench
from numprune.cli import args as a
from numprune.cli.inputs import protected_inputs
from numprune.errors import NumpruneError
from numprune.export import llamacpp
from numprune.extras import need
from numprune.io.output import check_target, output_file, write_text
from numprune.models import load_model, registry_folder

DEFAULT_QUANTS = ["f16", "q8_0", "q4_k_m"]


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="prefill/decode speed and memory of dense and pruned models")
    p.add_argument("--model", action="append", default=None,
                   help="model: 'smollm2' (embedded default), a local folder, or a hub id; repeat to compare, "
                   "the first is the reference")
    p.add_argument("--backend", choices=("transformers", "llama.cpp"), default="transformers",
                   help="transformers (default), or llama.cpp: each model folder exported to GGUF and measured there "
                   "at each --quant, batch 1")
    p.add_argument("--quant", type=a.comma_list(), default=None,
                   help=f"llama.cpp backend: GGUF types, comma-separated, from {', '.join(llamacpp.QUANTS)} (default "
                   f"{','.join(DEFAULT_QUANTS)}; all but f16 made by llama.cpp's quantiser)")
    p.add_argument("--batch", type=a.comma_list(a.positive_int), default=None,
                   help="batch sizes, comma-separated (default 1,8; llama.cpp backend: 1 only)")
    p.add_argument("--prompt-len", type=a.positive_int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=a.positive_int, default=128, help="decode steps (default 128)")
    p.add_argument("--warmup", type=a.nonnegative_int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--repeats", type=a.positive_int, default=3,
                   help="timed runs (default 3; llama.cpp: rounds, each timing every file once)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", type=a.dtype, default="float32", help=f"{', '.join(a.DTYPES)} (default float32)")
    p.add_argument("--threads", type=a.positive_int, default=None, help="CPU threads (default: torch's choice; "
                   "llama.cpp backend: the cores this process may use)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--plot", default=None, help="also plot speed and memory against pruning ratio to this PNG")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    p.add_argument("--verbose", action="store_true", help="llama.cpp backend: show llama.cpp's own log (loader, "
                   "quantiser) on stderr; without it, it is discarded")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.backend == "llama.cpp":
        return run_llama_cpp(args)
    if args.quant is not None:
        raise NumpruneError("--quant is for the llama.cpp backend (--backend llama.cpp)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise NumpruneError("--device cuda asked for, but torch sees no CUDA GPU")
    if args.plot:
        need("matplotlib", "--plot")
    specs = args.model or [None]
    inputs = check_outputs(args)
    ratios = [bench.pruning_ratio(spec) for spec in specs]  # a corrupt report fails here, before any measurement
    if args.threads:
        torch.set_num_threads(args.threads)
    # Loaded lazily, one at a time, so that each model's memory is measured without the others.
    models = ((spec or "smollm2", load_model(spec, args.dtype)[0].to(args.device)) for spec in specs)
    results = bench.bench(models, args.batch or [1, 8], ratios=ratios,
                          prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup,
                          repeats=args.repeats)
    print(bench.format_table(results))
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n", overwrite=args.overwrite, inputs=inputs)
    if args.plot:
        with output_file(args.plot, overwrite=args.overwrite, inputs=inputs) as tmp:
            bench.plot(results, tmp)
    return 0


def check_outputs(args) -> list:
    """``--json`` and ``--plot``, each checked against the run's inputs and the other, before any measurement;
    return the inputs."""
    inputs = protected_inputs(args)
    for path, other in ((args.json, args.plot), (args.plot, args.json)):
        if path:
            check_target(path, overwrite=args.overwrite, folder=False, inputs=inputs, outputs=[other])
    return inputs


def run_llama_cpp(args) -> int:
    """``--backend llama.cpp``: export, quantise and measure each model in llama.cpp."""
    if not llamacpp.available():
        raise NumpruneError(llamacpp.INSTALL_HINT)
    if args.batch not in (None, [1]):
        raise NumpruneError("--backend llama.cpp measures batch 1 only")
    if args.plot:
        raise NumpruneError("--plot is for the transformers backend")
    quants = args.quant or DEFAULT_QUANTS
    unknown = [q for q in quants if q not in llamacpp.QUANTS]
    if unknown:
        raise NumpruneError(f"unknown --quant {', '.join(unknown)}; choose from {', '.join(llamacpp.QUANTS)}")
    specs = args.model or [None]
    inputs = check_outputs(args)
    models = [(spec or "smollm2", registry_folder(spec) or spec) for spec in specs]
    with llamacpp.native_log(args.verbose), tempfile.TemporaryDirectory(prefix="numprune-bench-") as workdir:
        results = llamacpp.bench(models, quants, workdir=workdir, n_threads=args.threads,
                                 prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup,
                                 repeats=args.repeats)
    print(llamacpp.format_table(results))
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n", overwrite=args.overwrite, inputs=inputs)
    return 0
