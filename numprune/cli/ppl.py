"""``numprune ppl``: perplexity of a model on evaluation texts."""

from __future__ import annotations

from numprune.adapters import check_window
from numprune.cli import args as a
from numprune.cli.inputs import eval_specs, eval_windows, load
from numprune.data.self_generated import SELF
from numprune.errors import NumpruneError
from numprune.evaluate.perplexity import perplexity


def add_parser(commands) -> None:
    p = commands.add_parser("ppl", help="perplexity of a model")
    a.add_model(p)
    a.add_evaluation(p, ("--data", "--seqlen", "--max-windows"), "sotu", "evaluation data (comma-separated)")
    a.add_quiet(p)
    p.set_defaults(run=run)


def run(args) -> int:
    specs = eval_specs(args)
    if SELF in specs:
        raise NumpruneError(f"--data {SELF} is text a dense model samples, measured before and after pruning: use it "
                            f"with `numprune compare --data {SELF}` or `numprune prune --eval {SELF}`")
    model, tokenizer, source = load(args.model)
    print(f"model: {source}")
    for spec in specs:
        windows, info = eval_windows(tokenizer, spec, args)
        check_window(model, windows.shape[1])  # before any work
        value = perplexity(model, windows, progress=not args.quiet)["ppl"]
        print(f"{spec}: perplexity {value:.3f} ({info['windows']} windows of {info['seqlen']} tokens, no special tokens)")
    return 0
