"""Zero-shot accuracy through lm-evaluation-harness (the paper's seven tasks, MMLU optional).

lm-eval does the prompting and scoring; this module loads the tasks before the model (so a task
whose data cannot be fetched fails in seconds, with one clear line), hands lm-eval the model already
in memory, and reduces its results to one row per task. Hub task data needs the network; the task
``numprune_offline_arc`` ships with the package (``tasks/``) and runs anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from numprune.data.assets import installed_sources
from numprune.errors import NumpruneError
from numprune.extras import need
from numprune.io.output import check_target, write_text
from numprune.io.table import markdown_table
from numprune.models import load_model, model_folder, source_folder

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASKS_DIR = Path(__file__).with_name("tasks")


def packaged_tasks() -> list[str]:
    """Names of the tasks shipped in ``tasks/`` (one YAML each, named after its task)."""
    return sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))


def packaged_dataset(data_files: str, **_metadata):
    """lm-eval's ``custom_dataset`` hook for the packaged tasks: the JSON-lines file named in the task's
    YAML, read from beside it (a plain ``data_files`` path would be relative to the working directory)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(TASKS_DIR / data_files)})


def load_tasks(names: list[str]):
    """``(task_manager, tasks)``: each named task, group or tag built with its data, or a NumpruneError."""
    need("lm_eval", "zero-shot evaluation")
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown the table
    if not names:
        raise NumpruneError("no tasks given")
    # Indexing lm-eval's own few thousand task files takes seconds: skip it when only ours are asked for.
    own = packaged_tasks()
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(names) <= set(own))
    tasks = []
    for name in names:
        if name not in manager.all_tasks:
            raise NumpruneError(f"unknown task '{name}': use lm-eval task names (the paper's: {','.join(PAPER_TASKS)}) "
                                f"or the offline {', '.join(own)}")
        try:
            loaded = manager.load(name)
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise NumpruneError(f"could not load the data of task '{name}' (no network or not cached?): "
                                f"{reason}") from None
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        tasks.extend([top] if top is not None else loaded["tasks"].values())  # a tag expands to its tasks
    return manager, tasks


def evaluate(model, tokenizer=None, tasks=PAPER_TASKS, *, mmlu: bool = False, limit: int | None = None,
             batch_size: int = 8, num_fewshot: int | None = None, out: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict:
    """Accuracy of ``model`` (in memory, or a spec for ``load_model``: 'smollm2', a folder, a hub id) on
    ``tasks``; returns one row per requested task (metrics with their standard errors) and writes it
    as JSON to ``out`` when given (an existing file only with ``overwrite``; never inside the model's
    folder). ``limit`` evaluates only the first N items of each task."""
    if out is not None:
        inputs = [model_folder(model) if isinstance(model, str) else source_folder(model), source_folder(tokenizer),
                  *installed_sources()]
        check_target(out, overwrite=overwrite, folder=False, inputs=inputs)
    need("lm_eval", "zero-shot evaluation")
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    for name, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise NumpruneError(f"{name.replace('_', ' ')} must be a positive integer, got {value}")
    if num_fewshot is not None and num_fewshot < 0:
        raise NumpruneError(f"the number of few-shot examples must be 0 or more, got {num_fewshot}")
    names = list(dict.fromkeys(list(tasks) + (["mmlu"] if mmlu else [])))
    manager, task_objects = load_tasks(names)
    if isinstance(model, str):
        model, tokenizer, source = load_model(model)
    else:
        source = getattr(model.config, "_name_or_path", "") or type(model).__name__
    if tokenizer is None:
        raise NumpruneError(f"model {source} has no tokenizer; save one beside it")

    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    raw = simple_evaluate(model=lm, tasks=task_objects, task_manager=manager, num_fewshot=num_fewshot,
                          limit=limit, log_samples=False)
    results = {
        "model": source,
        "harness": f"lm-eval {lm_eval_version}",
        "protocol": {"tasks": names, "num_fewshot": num_fewshot or 0, "limit": limit, "batch_size": batch_size,
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "results": {name: _row(raw, name) for name in [*raw["results"], *raw.get("groups", {})]},
        "time_s": round(time.perf_counter() - start, 1),
    }
    results["requested"] = [n for n in names if n in results["results"]] or list(results["results"])
    rows = [results["results"][n] for n in results["requested"] if n != "mmlu"]
    accs = [row["acc"] for row in rows if "acc" in row]
    results["mean_acc"] = sum(accs) / len(accs) if accs else None
    if out is not None:
        write_text(out, json.dumps(results, indent=2) + "\n", overwrite=overwrite, inputs=inputs)
    return results


def _row(raw: dict, name: str) -> dict:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` as ``{"acc": x, "acc_stderr": s, ..., "samples": n}``
    (the unfiltered metrics, the only ones multiple-choice tasks have)."""
    metrics = {**raw["results"].get(name, {}), **raw.get("groups", {}).get(name, {})}
    row = {key.split(",")[0]: value for key, value in metrics.items() if key.endswith(",none")}
    samples = raw.get("n-samples", {}).get(name)
    if samples:
        row["samples"] = samples["effective"]
    return row


def format_table(results: dict) -> str:
    """One line per requested task and metric: task, metric, value, stderr (lm-eval's own layout)."""
    rows = []
    for name in results["requested"]:
        row = results["results"][name]
        for metric in ("acc", "acc_norm"):
            if metric in row:
                stderr = row.get(f"{metric}_stderr")
                rows.append((name, metric, f"{row[metric]:.4f}", f"{stderr:.4f}" if isinstance(stderr, float) else "-"))
    if results["mean_acc"] is not None:
        rows.append(("mean over tasks", "acc", f"{results['mean_acc']:.4f}", "-"))
    return markdown_table(("task", "metric", "value", "stderr"), rows)
