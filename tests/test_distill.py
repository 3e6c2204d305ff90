"""Healing by distillation (numprune.heal, mode distill; numprune.distill) on tiny random LLaMA models: it lowers the
KL to the dense model on the training windows (computed here from the two models' logits), recovers a model whose
weights can represent the dense one exactly, merges LoRA into weights that give the unmerged outputs, is deterministic
for a seed with a token budget, and saves and reloads; bad options and a missing peft are refused in one line."""

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import reload_all, tiny_llama, tiny_tokens
from hostile import refused
from test_heal import dense_with_dead_channels

from numprune.api import prune
from numprune.cli import main
from numprune.distill import prepare_student, train_student
from numprune.errors import NumpruneError
from numprune.heal import heal
from numprune.recipe import DISTILL_TOKENS, HealOptions, PruneOptions
from numprune.save import save_pruned


def kl(dense, pruned, tokens) -> float:
    """KL(dense || pruned) of the next-token distributions, averaged over every token of ``tokens``."""
    with torch.no_grad():
        teacher, student = dense(tokens).logits.double(), pruned(tokens).logits.double()
    return float(F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum")
                 / (tokens.numel()))


def test_distillation_lowers_the_kl_to_the_dense_model():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.4, heal=False, progress=False)
    before = kl(dense, pruned, tokens)
    healed, record = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", distill_lr=3e-3,
                          epochs=8)
    assert kl(dense, healed, tokens) < 0.5 * before
    assert record.distillation.steps == 8 * 6 and record.distillation.tokens == 8 * tokens.numel()
    assert record.distillation.stopped_by == "epochs" and record.layers == []
    assert torch.equal(healed.get_input_embeddings().weight, dense.get_input_embeddings().weight)  # not trained


def test_a_model_that_can_represent_the_dense_one_reaches_it():
    dense, pruned = dense_with_dead_channels()  # the pruned model's kept weights give the dense model exactly
    tokens = tiny_tokens(4, 16)
    with torch.no_grad():
        pruned.model.norm.weight.mul_(1.3)  # a wrong final norm, which distillation must learn back
    before = kl(dense, pruned, tokens)
    healed, _ = heal(dense, pruned, tokens, progress=False, mode="distill", distill_lr=1e-2, epochs=200, batch=4)
    assert before > 0.04 and kl(dense, healed, tokens) < 1e-3  # 50 times closer, on the way to 0


def test_lora_merges_into_weights_that_give_the_unmerged_outputs():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.4, heal=False, progress=False)
    original, kind = {name: p.clone() for name, p in pruned.named_parameters()}, type(pruned)
    opts = HealOptions(mode="distill", lora_rank=4, distill_lr=1e-2, epochs=2)
    wrapped, trained = prepare_student(pruned, opts)
    train_student(dense, wrapped, trained, tokens, opts, progress=False)
    probe = tiny_tokens(3, 20, seed=7)
    with torch.no_grad():
        unmerged = wrapped(input_ids=probe).logits
    merged = wrapped.merge_and_unload()
    assert merged is pruned and type(pruned) is kind
    assert sorted(name for name, _ in pruned.named_parameters()) == sorted(original)  # no LoRA left
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe).logits, unmerged, rtol=1e-5, atol=1e-5)
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(pruned.get_parameter(query), original[query])
    assert torch.equal(pruned.model.norm.weight, original["model.norm.weight"])  # LoRA trains only the adapters


def test_heal_with_lora_lowers_the_kl_and_leaves_a_plain_model():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.4, heal=False, progress=False)
    names = sorted(name for name, _ in pruned.named_parameters())
    before = kl(dense, pruned, tokens)
    healed, _ = heal(dense, pruned, tokens, progress=False, mode="distill", lora_rank=4, distill_lr=1e-2, epochs=4)
    assert healed is pruned and sorted(name for name, _ in healed.named_parameters()) == names
    assert not any(p.requires_grad for p in healed.parameters())
    assert kl(dense, healed, tokens) < before


def test_same_seed_and_token_budget_same_weights():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)

    def run(seed, **budget):
        return heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", distill_lr=1e-3, seed=seed,
                    **budget)

    runs = [run(seed, tokens=100) for seed in (5, 5, 6)]
    same = [all(torch.equal(a, b) for a, b in zip(runs[0][0].parameters(), other[0].parameters())) for other in runs[1:]]
    assert same == [True, False]  # the seed orders the windows
    assert runs[0][1].distillation.steps == 7 and runs[0][1].distillation.tokens == 112  # 16-token windows up to 100
    lora = [run(3, tokens=64, lora_rank=2)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(lora[0].parameters(), lora[1].parameters()))


def test_a_minutes_budget_records_the_tokens_that_rerun_it():
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    _, timed = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill", minutes=0.005)
    assert timed.distillation.stopped_by == "minutes" and timed.distillation.steps >= 1
    _, rerun = heal(dense, copy.deepcopy(pruned), tokens, progress=False, mode="distill",
                    tokens=timed.distillation.tokens)
    assert (rerun.distillation.steps, rerun.distillation.tokens) == (timed.distillation.steps, timed.distillation.tokens)


def test_local_then_distill_records_both(tmp_path):
    dense, tokens = tiny_llama("gqa9"), tiny_tokens(6, 16)
    pruned, report = prune(dense, tokens, ratio=0.3, heal=True, heal_mode="local+distill", heal_tokens=64,
                           heal_distill_lr=1e-3, progress=False)
    healing = report["healing"]
    assert healing["mode"] == "local+distill" and len(healing["layers"]) == 3
    assert healing["distillation"]["tokens"] == 64 and healing["distillation"]["curve"][-1]["step"] == 4
    assert report["options"]["heal_tokens"] == 64 and report["options"]["heal_distill_lr"] == 1e-3
    probe = tiny_tokens(3, 20, seed=7)
    with torch.no_grad():
        expected = pruned(probe).logits
    out = save_pruned(pruned, None, report, tmp_path / "healed")
    assert json.loads((out / "pruning_report.json").read_text())["healing"] == healing
    [(logits, _)] = reload_all([], [out], probe, tmp_path)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_recipes_without_a_mode_leave_it_to_the_run():
    opts = PruneOptions.parse("numerical-robust", 0.2)
    assert opts.heal is None and "heal" not in opts.requested()  # the run decides: the method heals where it can
    assert PruneOptions.parse("numerical-robust:heal=true", 0.2).requested()["heal"] is True  # asked stays asked
    opts = opts.decide_healing(True)
    assert opts.heal and opts.heal_options() == HealOptions() and opts.heal_mode is None and opts.heal_epochs is None
    assert not PruneOptions.parse("flap", 0.2).decide_healing(True).heal
    assert not PruneOptions.parse("numerical-robust", 0.2).decide_healing(False).heal
    assert HealOptions().decided("distill") == HealOptions(mode="distill", tokens=DISTILL_TOKENS, epochs=1)
    assert HealOptions().decided("local") == HealOptions(mode="local", epochs=1)
    assert HealOptions(epochs=3).decided("distill") == HealOptions(mode="distill", epochs=3)  # passes, not tokens
    assert HealOptions(mode="local").decided("distill").mode == "local"  # a mode given stays
    distilled = PruneOptions.parse("numerical-robust:heal_tokens=4096", 0.2)  # a budget asks for distillation
    assert distilled.heal_options() == HealOptions(mode="distill", tokens=4096)
    local = PruneOptions.parse("flap:heal_loss=mse", 0.2)
    assert local.heal and local.heal_options() == HealOptions(mode="local", loss="mse")
    both = HealOptions.checked(params="norms", tokens=64)
    assert both.mode == "local+distill"


@pytest.mark.parametrize("options,message", [
    (dict(mode="kl"), "unknown healing mode 'kl'; choose from local, distill, local\\+distill"),
    (dict(mode="distill", tokens=0), "distillation budget in tokens must be a positive integer, got 0"),
    (dict(mode="distill", minutes=-1.0), "distillation budget in minutes must be a finite number > 0"),
    (dict(mode="distill", distill_lr=0.0), "distillation learning rate must be a finite number > 0"),
    (dict(mode="distill", lora_rank=-2), "LoRA rank must be an integer >= 0"),
    (dict(mode="local", tokens=512), "the healing option tokens applies to distillation; the local mode does not "
     "distil"),
])
def test_bad_distillation_options_are_refused(options, message):
    dense = tiny_llama("gqa")
    with pytest.raises(NumpruneError, match=message):
        heal(dense, copy.deepcopy(dense), tiny_tokens(), progress=False, **options)


def test_lora_without_peft_is_refused_before_the_work(monkeypatch):
    dense, tokens = tiny_llama("gqa"), tiny_tokens(6, 16)
    pruned, _ = prune(dense, tokens, ratio=0.3, heal=False, progress=False)
    before = copy.deepcopy(pruned.state_dict())
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails as when it is not installed
    with pytest.raises(NumpruneError, match=r"distillation with LoRA needs peft, which is not installed: "
                                            r"pip install 'numprune\[heal\]'"):
        heal(dense, pruned, tokens, progress=False, mode="local+distill", lora_rank=4)
    assert all(torch.equal(before[name], p) for name, p in pruned.state_dict().items())


def test_prune_heal_distill_from_the_command_line(tiny_model_folder, tmp_path):
    out = tmp_path / "healed"
    calibration = ["--model", str(tiny_model_folder), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32"]
    assert main(["prune", *calibration, "--heal", "--heal-mode", "distill", "--heal-tokens", "64", "--heal-lora-rank",
                 "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["options"]["heal_mode"] == "distill" and report["options"]["heal_lora_rank"] == 2
    assert report["healing"]["distillation"]["tokens"] == 64 and report["healing"]["layers"] == []
    refused("a distillation budget without distillation", "the healing option tokens applies to distillation",
            "prune", *calibration, "--heal-mode", "local", "--heal-tokens", "64", "--out", tmp_path / "out", "--quiet",
            inputs=[tiny_model_folder])
    refused("a zero budget", "--heal-minutes: must be a finite number > 0", "prune", *calibration, "--heal",
            "--heal-mode", "distill", "--heal-minutes", "0", "--out", tmp_path / "out", "--quiet",
            inputs=[tiny_model_folder])
    assert not (tmp_path / "out").exists()
