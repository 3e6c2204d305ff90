"""The one markdown-table writer and the tables built on it (zero-shot, llama.cpp bench, compare), each against
a rendering written out here from the inputs. bench's own tables: tests/test_bench.py, test_image_measures.py."""

import pytest
import torch

from numprune import compare
from numprune.evaluate import zeroshot
from numprune.evaluate.perplexity import Perplexity
from numprune.export import llamacpp
from numprune.io.table import markdown_table

MiB = 2**20


def cells(line: str) -> list[str]:
    """The cells of one table line ``| a | b |``."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return line[2:-2].split(" | ")


@pytest.mark.parametrize("rows", [[], [("a", 1, 2.5)], [("x y", None, "-"), (0, "", "1.0%")]])
def test_markdown_table_is_a_header_a_rule_and_one_line_a_row(rows):
    table = markdown_table(("name", "count", "value"), rows)
    lines = table.split("\n")
    assert len(lines) == 2 + len(rows) and not table.endswith("\n")
    assert cells(lines[0]) == ["name", "count", "value"] and lines[1] == "|---|---|---|"
    assert [cells(line) for line in lines[2:]] == [[str(c) for c in row] for row in rows]


def test_zeroshot_table_has_a_line_per_task_and_metric_then_the_mean():
    results = {"requested": ["boolq", "piqa", "arc_easy"], "mean_acc": 0.61234,
               "results": {"boolq": {"acc": 0.62171, "acc_stderr": 0.00848},
                           "piqa": {"acc": 0.7, "acc_norm": 0.71, "acc_stderr": None, "acc_norm_stderr": 0.0105},
                           "arc_easy": {"acc_norm": 0.5}}}
    expected = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metric in (("boolq", "acc"), ("piqa", "acc"), ("piqa", "acc_norm"), ("arc_easy", "acc_norm")):
        row = results["results"][task]
        stderr = row.get(f"{metric}_stderr")
        expected.append(f"| {task} | {metric} | {row[metric]:.4f} | {'-' if stderr is None else f'{stderr:.4f}'} |")
    mean = f"| mean over tasks | acc | {results['mean_acc']:.4f} | - |"
    assert zeroshot.format_table(results) == "\n".join([*expected, mean])
    assert zeroshot.format_table({**results, "mean_acc": None}) == "\n".join(expected)


def gguf_run(model: str, quant: str, scale: int, perplexity: float | None = None) -> dict:
    run = {"model": model, "quant": quant, "parameters": 134_515_008 // scale, "file_bytes": 270 * MiB // scale,
           "prefill": {"tokens_per_s": 987.654 * scale},
           "decode": {"tokens_per_s": 80.04 * scale, "tokens_per_s_min": 70.0, "tokens_per_s_max": 90.55 * scale,
                      "ms_per_token": 12.49 / scale},
           "model_peak_bytes": 400 * MiB // scale,
           "vs_reference": {"decode_speedup": float(scale), "parameter_ratio": 1 / scale, "file_ratio": 1 / scale},
           "protocol": {"llama_cpp_python": "0.3.36", "threads": 2, "prompt_len": 64, "new_tokens": 128, "warmup": 1,
                        "repeats": 3}}
    return run if perplexity is None else {**run, "perplexity": {"ppl": perplexity}}


@pytest.mark.parametrize("perplexities", [(None, None), (12.3456, None)])
def test_llama_cpp_table_has_a_row_per_model_and_type_then_the_protocol(perplexities):
    runs = [gguf_run("smollm2", "f16", 1, perplexities[0]), gguf_run("runs/p", "q8_0", 2, perplexities[1])]
    with_ppl = perplexities[0] is not None
    header = ("model", "type", "params", "file MiB", "prefill tok/s", "decode tok/s (median [min-max])",
              "decode ms/token", "peak MiB", "decode speed-up", "params dense/pruned", "file ratio",
              *(["perplexity"] if with_ppl else []))
    lines = llamacpp.format_table({"runs": runs}).split("\n")
    assert cells(lines[0]) == list(header) and lines[1] == "|" + "---|" * len(header)
    for line, r in zip(lines[2:4], runs):
        d, vs = r["decode"], r["vs_reference"]
        expected = [r["model"], r["quant"], f"{r['parameters'] / 1e6:.1f}M", f"{r['file_bytes'] / MiB:.1f}",
                    f"{r['prefill']['tokens_per_s']:.1f}",
                    f"{d['tokens_per_s']:.1f} [{d['tokens_per_s_min']:.1f}-{d['tokens_per_s_max']:.1f}]",
                    f"{d['ms_per_token']:.2f}", f"{r['model_peak_bytes'] / MiB:.1f}", f"{vs['decode_speedup']:.2f}x",
                    f"{vs['parameter_ratio']:.2f}", f"{vs['file_ratio']:.2f}"]
        if with_ppl:
            expected.append(f"{r['perplexity']['ppl']:.2f}" if "perplexity" in r else "-")
        assert cells(line) == expected
    assert lines[4:] == ["", "llama.cpp (llama-cpp-python 0.3.36), 2 threads, batch 1, 64-token prompt, "
                             "128 greedy new tokens, 1 warm-up + 3 timed runs"]


def test_compare_markdown_has_a_row_per_method_and_ratio_and_a_column_per_evaluation_set():
    results = {"evaluation": {"sotu": {}, "moby-dick": {}}, "rows": [
        {"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0, "ppl": {"sotu": 12.3456, "moby-dick": 20.001}},
        {"method": "numerical:compensation=none", "ratio": 0.3, "achieved_ratio": 0.29876,
         "ppl": {"sotu": 15.5, "moby-dick": 30.4449}},
        {"method": "flap", "ratio": 0.5, "error": "ratio 0.5 would leave layer 0 without heads"}]}
    expected = ["| method | ratio | achieved | sotu | moby-dick |", "|---|---|---|---|---|"]
    for row in results["rows"][:2]:
        expected.append(f"| {row['method']} | {round(100 * row['ratio'])}% | {100 * row['achieved_ratio']:.1f}% | "
                        f"{row['ppl']['sotu']:.2f} | {row['ppl']['moby-dick']:.2f} |")
    error = results["rows"][2]["error"]
    expected.append(f"| flap | 50% | - | {error} | {error} |")  # a failed cell says why in every column
    evaluation = Perplexity({name: (torch.zeros(1, 2, dtype=torch.long), {}) for name in results["evaluation"]})
    assert compare.markdown(results, evaluation) == "\n".join(expected) + "\n"
