"""The auto allocation: its choice against held-out losses computed apart on physically pruned models, held-out
windows apart from the calibration windows, determinism, the report, and equality with blend at the chosen weight."""

import json
import math

import pytest
import torch
from conftest import tiny_llama, tiny_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from numprune import api, auto
from numprune.allocate import AUTO_WEIGHTS
from numprune.api import calibrate
from numprune.cli import main
from numprune.compare import recipes, run_grid
from numprune.data.corpora import calibration_windows, held_out_windows
from numprune.errors import NumpruneError
from numprune.evaluate.perplexity import Perplexity, perplexity
from numprune.stream import prune_streaming


def prune(*args, **options):
    """numprune.prune without the default method's healing: auto's choice is the pruning's, and the candidates are
    compared unhealed (healing the chosen model is tests/test_heal_default.py's)."""
    return api.prune(*args, heal=False, **options)

RATIO = 0.3


def problem(seed: int = 0):
    model = tiny_llama("gqa", layers=3, seed=seed)
    holdout = {"text": tiny_tokens(3, 20, seed=5), "other": tiny_tokens(2, 20, seed=6)}
    return model, tiny_tokens(16, 24), holdout


def test_auto_picks_the_candidate_with_the_lowest_held_out_loss():
    """Each candidate pruned directly (blend at its weight, physically shrunk) and measured apart: auto's choice is
    their argmin, and its recorded figures are theirs (masked == shrunk)."""
    model, tokens, holdout = problem()
    _, report = prune(model, tokens, ratio=RATIO, allocation="auto", holdout=holdout, progress=False)
    record = report["auto_allocation"]
    scores = {}
    for weight, row in zip(AUTO_WEIGHTS, record["candidates"]):
        pruned, _ = prune(model, tokens, ratio=RATIO, allocation="blend", blend_weight=weight, progress=False)
        ppl = {name: perplexity(pruned, w, progress=False)["ppl"] for name, w in holdout.items()}
        scores[weight] = math.exp(sum(math.log(p) for p in ppl.values()) / len(ppl))
        assert row["blend_weight"] == weight
        assert row["perplexities"] == pytest.approx(ppl, rel=1e-4)
    best = min(scores.values())
    winners = [w for w, s in scores.items() if s < best * (1 + 1e-6)]  # equal widths at two weights: a tie
    assert all(s > 1.01 * best for w, s in scores.items() if w not in winners)  # a clear best otherwise
    assert len(winners) < len(scores)
    assert record["chosen_blend_weight"] == winners[0]  # a tie goes to the weight nearest flap-widths


def test_auto_follows_the_held_out_text(monkeypatch):
    """Only two candidates, and held-out text made of the calibration windows themselves: the candidate that fits the
    calibration best wins; the KL score, checked against a direct full-vocabulary computation, ranks them alike."""
    monkeypatch.setattr("numprune.pipeline.AUTO_WEIGHTS", (0.0, 1.0))
    model, tokens, _ = problem()
    _, report = prune(model, tokens, ratio=RATIO, allocation="auto", holdout=tokens[:4], progress=False)
    rows = report["auto_allocation"]["candidates"]
    assert [r["blend_weight"] for r in rows] == [0.0, 1.0]
    for row in rows:
        pruned, _ = prune(model, tokens, ratio=RATIO, allocation="blend", blend_weight=row["blend_weight"],
                          progress=False)
        with torch.no_grad():
            dense = torch.log_softmax(model(tokens[:4]).logits[:, :-1].double(), -1)
            mine = torch.log_softmax(pruned(tokens[:4]).logits[:, :-1].double(), -1)
        full_kl = (dense.exp() * (dense - mine)).sum(-1).mean().item()
        assert 0 <= row["kl"] <= full_kl + 1e-6  # the binned KL never exceeds the full one
        assert row["kl"] > 0.5 * full_kl  # and holds most of it (64 of 97 tokens kept apart)
    best = min(rows, key=lambda r: r["perplexity"])
    assert report["auto_allocation"]["chosen_blend_weight"] == best["blend_weight"]


def test_chosen_model_is_blend_at_the_chosen_weight_byte_for_byte():
    model, tokens, holdout = problem(seed=1)
    chosen, report = prune(model, tokens, ratio=0.4, allocation="auto", holdout=holdout, progress=False)
    weight = report["auto_allocation"]["chosen_blend_weight"]
    direct, _ = prune(model, tokens, ratio=0.4, allocation="blend", blend_weight=weight, progress=False)
    a, b = chosen.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report["layers"] == _["layers"]


def test_auto_leaves_the_model_as_it_was_and_is_deterministic():
    model, tokens, holdout = problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = prune(model, tokens, ratio=RATIO, allocation="auto", holdout=holdout, progress=False)
    second = prune(model, tokens, ratio=RATIO, allocation="auto", holdout=holdout, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    strip = lambda r: {k: v for k, v in r["auto_allocation"].items() if k != "time_s"}  # noqa: E731
    assert strip(first[1]) == strip(second[1])
    assert all(torch.equal(first[0].state_dict()[k], v) for k, v in second[0].state_dict().items())
    record = first[1]["auto_allocation"]
    assert record["score"] == auto.SCORE and {r["blend_weight"] for r in record["candidates"]} == set(AUTO_WEIGHTS)
    assert record["holdout"]["text"] == {"windows": 3, "seqlen": 20}
    assert first[1]["options"]["allocation"] == "auto"


def test_inplace_auto_equals_the_copy():
    model, tokens, holdout = problem()
    copied, _ = prune(model, tokens, ratio=RATIO, allocation="auto", holdout=holdout, progress=False)
    inplace, _ = prune(model, tokens, ratio=RATIO, allocation="auto", holdout=holdout, inplace=True, progress=False)
    assert all(torch.equal(copied.state_dict()[k], v) for k, v in inplace.state_dict().items())


def test_api_fallback_holds_out_the_last_windows():
    """Without a holdout the last eighth of the windows is held out and the rest calibrates: the same run as
    giving that split by hand."""
    model, tokens, _ = problem()
    implicit, report = prune(model, tokens, ratio=RATIO, allocation="auto", progress=False)
    explicit, by_hand = prune(model, tokens[:14], ratio=RATIO, allocation="auto", holdout={"calibration": tokens[14:]},
                              progress=False)
    assert report["calibration"]["tokens"] == 14 * 24
    assert report["auto_allocation"]["holdout"]["calibration"]["windows"] == 2
    assert ([r["perplexity"] for r in report["auto_allocation"]["candidates"]]
            == [r["perplexity"] for r in by_hand["auto_allocation"]["candidates"]])
    assert all(torch.equal(implicit.state_dict()[k], v) for k, v in explicit.state_dict().items())


class CharTokenizer:
    """One token per character, its code point: a token's id says where in the text it came from."""

    def __call__(self, chunks, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in chunk] for chunk in chunks]}


@pytest.mark.parametrize("spec", ["{text}", "{text}:3+{other}"])
def test_held_out_windows_never_overlap_calibration_windows(tmp_path, spec):
    """Texts whose every character is unique: the ids of calibration and held-out windows are their positions."""
    paths = {}
    for name, offset in (("text", 0x100), ("other", 0x10000)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("".join(chr(offset + i) for i in range(6000)), encoding="utf-8")
    spec = spec.format(**paths)
    tokenizer = CharTokenizer()
    calibration, _ = calibration_windows(tokenizer, spec, 24, 100, seed=3)
    held = held_out_windows(tokenizer, spec, 24, 100, 3, count=5, length=64)
    assert set(held) == {str(p) for p in paths.values()} if "+" in spec else {spec}
    used = set(calibration.flatten().tolist())
    for windows, info in held.values():
        assert windows.shape == (5, 64)
        ids = windows.flatten().tolist()
        assert not used & set(ids) and len(set(ids)) == len(ids)  # apart from calibration and from each other
        assert info["starts"] == [w[0].item() - (0x100 if w[0] < 0x10000 else 0x10000) for w in windows]


def test_held_out_windows_refuse_a_text_without_room(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("".join(chr(0x100 + i) for i in range(300)), encoding="utf-8")
    with pytest.raises(NumpruneError, match="apart from its calibration windows"):
        held_out_windows(CharTokenizer(), str(path), 8, 100, 0, count=4, length=64)


def test_refusals(tiny_model_folder, tmp_path):
    model, tokens, holdout = problem()
    stats = calibrate(model, tokens, progress=False)
    with pytest.raises(NumpruneError, match="needs held-out windows when statistics are given"):
        prune(model, tokens, stats=stats, ratio=RATIO, allocation="auto", progress=False)
    with pytest.raises(NumpruneError, match="for the auto allocation only"):
        prune(model, tokens, ratio=RATIO, allocation="blend", holdout=holdout, progress=False)
    with pytest.raises(NumpruneError, match="sequential statistics"):
        prune(model, tokens, ratio=RATIO, allocation="auto", compensation_stats="sequential", progress=False)
    with pytest.raises(NumpruneError, match="blend weight applies to the blend allocation only"):
        prune(model, tokens, ratio=RATIO, allocation="auto", blend_weight=0.5, progress=False)
    with pytest.raises(NumpruneError, match="held-out set 'text' holds ids outside"):
        prune(model, tokens, ratio=RATIO, allocation="auto", holdout={"text": holdout["text"] + 200}, progress=False)
    with pytest.raises(NumpruneError, match="give at least two"):
        prune(model, tokens[:1], ratio=RATIO, allocation="auto", progress=False)
    with pytest.raises(NumpruneError, match="streaming never holds the whole model"):
        prune_streaming(tiny_model_folder, tiny_tokens(4, 16), ratio=RATIO, out=tmp_path / "out", allocation="auto",
                        progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_holds_out_calibration_text_and_the_models_own_samples(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "auto"
    args = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--allocation", "auto", "--calib", "sotu-val",
            "--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    record = report["auto_allocation"]
    assert set(record["holdout"]) == {"sotu-val", "self"}
    assert record["holdout"]["sotu-val"]["seqlen"] == 31 and record["holdout"]["self"]["windows"] == auto.HOLDOUT_WINDOWS
    assert record["holdout"]["self"]["seed"] == auto.HOLDOUT_SEED_OFFSET
    assert report["options"]["allocation"] == "auto" and len(record["candidates"]) == len(AUTO_WEIGHTS)
    assert f"which chose blend weight {record['chosen_blend_weight']}" in (out / "README.md").read_text()
    assert main([*args, "--stream", "--out", str(tmp_path / "streamed")]) == 2
    assert "--stream never holds the whole model" in capsys.readouterr().err


def test_compare_runs_auto_on_the_shared_statistics():
    """In a grid, auto's row is the row of blend at the weight it chose (same statistics, same figures)."""
    model, tokens, holdout = problem()
    evaluation = Perplexity({"text": (tiny_tokens(2, 20, seed=9), {"windows": 2, "seqlen": 20})})
    entries = ["numerical:allocation=auto"] + [f"numerical:allocation=blend:blend_weight={w}" for w in AUTO_WEIGHTS]
    results = run_grid(model, tokens, recipes(entries, [RATIO]), evaluation, calibration_info={}, progress=False,
                       holdout=holdout)
    rows = {row["method"]: row for row in results["rows"]}
    chosen = rows[entries[0]]["auto_allocation"]["chosen_blend_weight"]
    assert rows[entries[0]]["ppl"] == rows[f"numerical:allocation=blend:blend_weight={chosen}"]["ppl"]


def test_held_out_size_is_chosen_and_capped_by_the_calibration_windows(tiny_model_folder, tmp_path):
    """holdout_windows draws the asked count and length of each held-out text, never longer than a calibration window
    less the sampling prompt (so the default HOLDOUT_SEQLEN is cut too); a size of nothing is refused."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i}" for i in range(3000)), encoding="utf-8")
    held = auto.holdout_windows(model, tokenizer, str(text), 4, 64, 0, windows=6, length=40)
    assert {name: tuple(w.shape) for name, (w, _) in held.items()} == {str(text): (6, 40), "self": (6, 40)}
    assert held["self"][1]["windows"] == 6 and held[str(text)][1]["seqlen"] == 40
    capped = auto.holdout_windows(model, tokenizer, str(text), 4, 64, 0, windows=2, length=512)
    assert {tuple(w.shape) for w, _ in capped.values()} == {(2, 63)}
    default = auto.holdout_windows(model, tokenizer, str(text), 4, 64, 0)
    assert {tuple(w.shape) for w, _ in default.values()} == {(auto.HOLDOUT_WINDOWS, 63)}
    with pytest.raises(NumpruneError, match="at least one window of two or more tokens"):
        auto.holdout_windows(model, tokenizer, str(text), 4, 64, 0, windows=0)
