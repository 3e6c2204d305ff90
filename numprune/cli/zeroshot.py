"""``numprune eval``: zero-shot accuracy through lm-evaluation-harness."""

from __future__ import annotations

from numprune.cli import args as a
from numprune.evaluate.zeroshot import PAPER_TASKS, evaluate, format_table, packaged_tasks


def add_parser(commands) -> None:
    p = commands.add_parser("eval", help="zero-shot accuracy through lm-evaluation-harness")
    p.add_argument("--model", default=None, help="model: 'smollm2' (embedded default), 'gemma3-270m', a local "
                   "folder, or a hub id")
    p.add_argument("--tasks", type=a.comma_list(), default=",".join(PAPER_TASKS), help="comma-separated lm-eval "
                   f"tasks (default: the paper's seven; offline: {', '.join(packaged_tasks())})")
    p.add_argument("--mmlu", action="store_true", help="also evaluate MMLU (57 subjects)")
    p.add_argument("--limit", type=a.positive_int, default=None, help="only the first N items of each task "
                   "(a quick look)")
    p.add_argument("--batch-size", type=a.positive_int, default=8, help="batch size (default 8)")
    p.add_argument("--num-fewshot", type=a.nonnegative_int, default=None, help="few-shot examples (default 0)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=run)


def run(args) -> int:
    results = evaluate(args.model or "smollm2", tasks=args.tasks, mmlu=args.mmlu, limit=args.limit,
                       batch_size=args.batch_size, num_fewshot=args.num_fewshot, out=args.out,
                       overwrite=args.overwrite)
    print(f"model: {results['model']} ({results['harness']}, {results['protocol']['num_fewshot']}-shot"
          f"{', limit ' + str(args.limit) if args.limit else ''}, {results['time_s']:.0f}s)")
    print(format_table(results))
    if args.out:
        print(f"saved: {args.out}")
    return 0
