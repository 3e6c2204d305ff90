"""Distillation: the pruned model learns the dense model's next-token distribution on the calibration windows.

Block-local healing (numprune.heal) fits each layer to the dense layer's output, but most of a pruned model's
error rides in the residual stream, where a layer-by-layer fit hardly reaches it. Distillation trains the whole
pruned model at once: the loss is KL(dense || pruned) of the two models' next-token distributions
(temperature 1), averaged over every token of a batch of calibration windows, plus, with weight ``hidden``, the
hidden-state term ``hidden_gap``: each decoder layer's output error, relative to the dense output's energy, averaged
over the layers. The teacher's logits (and layer outputs) are computed per batch without gradients, never stored;
both models sit in memory. The trained weights are the decoder
layers' and the final norm's (all kept weights), or LoRA adapters on every linear layer of the decoder, merged
back so the saved model is plain; the embeddings and the output head, which pruning did not touch, stay the
dense model's. AdamW, its learning rate decaying to 0 along a cosine over the budget.

The budget is a number of calibration tokens (``tokens``; otherwise ``epochs`` passes over the windows) and
is deterministic for a seed; a budget in wall minutes (``minutes``) stops on the clock, and the schedule then
follows the clock too, so the run depends on the machine's speed: its record says the tokens it used, and
``tokens=`` that number reruns it reproducibly over the same windows (with the schedule over tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from numprune.adapters import Adapter
from numprune.extras import need
from numprune.recipe import HealOptions

CURVE_POINTS = 50  # the loss curve's points at most (the mean loss over each stretch of steps)


@dataclass
class DistillRecord:
    """What ``distill`` did: steps, tokens trained on, seconds, what stopped it, and its loss curve."""

    steps: int
    tokens: int
    seconds: float
    stopped_by: str  # "tokens", "epochs" or "minutes"
    curve: list[dict]  # {"step", "tokens", "seconds", "kl"[, "hidden"]}: the mean over the steps since the previous point

    def to_json(self) -> dict:
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "stopped_by": self.stopped_by, "curve": self.curve}


def memory_needed(adapter: Adapter, opts: HealOptions, seqlen: int, keep: float = 1.0, resident: bool = False) -> int:
    """Bytes distilling ``adapter``'s model takes beyond what it holds already, an estimate made before the work.

    The model in float32 (``resident``: the whole of it, for a pruned model not built yet; else only what
    float32 adds to its own dtype), the trained weights' gradients and AdamW's two moments (LoRA's are
    negligible), and one batch's logits (teacher's, student's, their log-softmaxes and gradient) and saved
    activations. ``keep`` scales the decoder layers' weights: the dense model's adapter with the share pruning
    will keep estimates the pruned model's need before pruning."""
    model = adapter.model
    embeddings = model.get_input_embeddings().weight
    vocab, hidden = embeddings.shape
    head = model.get_output_embeddings()
    frozen = {id(embeddings)} | ({id(p) for p in head.parameters()} if head is not None else set())
    untrained = sum(p.numel() for p in model.parameters() if id(p) in frozen)
    trained = keep * sum(p.numel() for p in model.parameters() if id(p) not in frozen)
    weights = (untrained + trained) * (4 if resident else max(0, 4 - embeddings.element_size()))
    state = 0 if opts.lora_rank else 12 * trained
    per_token = 6 * vocab + sum(12 * hidden + 4 * adapter.mlp_width(i)
                                + adapter.attention_layout(i).num_heads * seqlen for i in range(adapter.num_layers()))
    return int(weights + state + 4 * opts.batch * seqlen * per_token)


def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over the tokens (natural log)."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1).mean()


def hidden_gap(teacher_states: tuple[torch.Tensor, ...], student_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over the decoder layers of the student's squared output error over the teacher output's mean square.

    The states are transformers' ``hidden_states``: the embeddings (identical in both, skipped), then each decoder
    layer's output, the last one after the final norm. Relative, so that the layers whose residual stream is
    large do not decide alone."""
    gaps = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
            for t, s in zip(teacher_states[1:], student_states[1:], strict=True)]
    return torch.stack(gaps).mean()


def outputs(model: nn.Module, ids: torch.Tensor, hidden: bool = False):
    """The model's outputs for every position of ``ids`` (no cache): logits, and every layer's output if ``hidden``."""
    return model(input_ids=ids.to(model.get_input_embeddings().weight.device), use_cache=False,
                 output_hidden_states=hidden)


def distillation_loss(dense: nn.Module, student: nn.Module, ids: torch.Tensor, hidden: float) -> tuple[torch.Tensor, dict]:
    """KL(dense || student) plus ``hidden`` times their hidden-state gap (computed only when ``hidden`` > 0), and
    the terms as numbers."""
    with torch.no_grad():
        teacher = outputs(dense, ids, hidden > 0)
    taught = outputs(student, ids, hidden > 0)
    kl = kl_to_teacher(teacher.logits.to(taught.logits.device), taught.logits)
    if not hidden:
        return kl, {"kl": float(kl.detach())}
    gap = hidden_gap([t.to(taught.logits.device) for t in teacher.hidden_states], taught.hidden_states)
    return kl + hidden * gap, {"kl": float(kl.detach()), "hidden": float(gap.detach())}


def distill(dense: nn.Module, pruned: nn.Module, tokens: torch.Tensor, opts: HealOptions, device: torch.device,
            progress: bool = True) -> DistillRecord:
    """Train ``pruned`` (in place, on ``device`` in float32, then back where and in the dtype it was) to the dense
    model's next-token distribution on ``tokens`` [windows, seqlen] within ``opts``' budget."""
    home = pruned.get_input_embeddings().weight
    home_device, home_dtype = home.device, home.dtype
    pruned.to(device, torch.float32)
    try:
        student, trained = prepare_student(pruned, opts)
        record = train_student(dense, student, trained, tokens, opts, progress)
        if opts.lora_rank:
            merged = student.merge_and_unload()
            assert merged is pruned  # merging puts the plain layers back into the pruned model itself
    finally:
        for p in pruned.parameters():
            p.requires_grad_(False)
        pruned.to(home_device, home_dtype)
    return record


def prepare_student(model: nn.Module, opts: HealOptions) -> tuple[nn.Module, list[nn.Parameter]]:
    """The module to train (the model, or its LoRA-wrapped self: ``merge_and_unload`` merges it back) and the
    parameters that train; every other parameter is frozen."""
    frozen = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        frozen |= {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if not opts.lora_rank:
        trained = [p for p in model.parameters() if id(p) not in frozen]
        for p in trained:
            p.requires_grad_(True)
        return model, trained
    peft = need("peft", "distillation with LoRA")
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    config = peft.LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank, lora_dropout=0.0, target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)  # LoRA's initial A matrices
        wrapped = peft.get_peft_model(model, config)
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def _plan(windows: int, seqlen: int, opts: HealOptions) -> tuple[int | None, str]:
    """Steps the token budget allows (None: the clock decides alone), and which budget that is."""
    if opts.tokens is not None:
        per_pass, full = windows * seqlen, opts.batch * seqlen
        passes, rest = divmod(opts.tokens, per_pass)
        steps_per_pass = math.ceil(windows / opts.batch)
        return passes * steps_per_pass + (math.ceil(rest / full) if rest else 0), "tokens"
    if opts.minutes is not None:
        return None, "minutes"
    return opts.epochs * math.ceil(windows / opts.batch), "epochs"


def _batches(windows: int, batch: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Windows in batches, pass after pass, each pass in a new random order."""
    while True:
        order = torch.randperm(windows, generator=generator, device="cpu").tolist()
        yield from (order[i:i + batch] for i in range(0, windows, batch))


def train_student(dense: nn.Module, student: nn.Module, trained: list[nn.Parameter], tokens: torch.Tensor,
                  opts: HealOptions, progress: bool) -> DistillRecord:
    """Train ``trained`` (of ``student``) to ``dense``'s next-token distribution (and, by ``opts.hidden``, its layer
    outputs) on ``tokens`` within the budget."""
    steps, stopped_by = _plan(tokens.shape[0], tokens.shape[1], opts)
    limit = opts.minutes * 60 if opts.minutes is not None else math.inf
    optimizer = torch.optim.AdamW(trained, lr=opts.distill_lr, weight_decay=0.0)  # the target is the teacher, not 0
    every = max(1, (steps or 10 * CURVE_POINTS) // CURVE_POINTS)
    dense.eval()
    student.eval()  # no dropout: the same windows give the same loss
    start, step, used, curve, stretch = time.perf_counter(), 0, 0, [], []
    batches = _batches(tokens.shape[0], opts.batch, torch.Generator().manual_seed(opts.seed))
    with tqdm(total=steps, desc="distilling", unit="step", disable=not progress) as bar:
        while steps is None or step < steps:
            elapsed = time.perf_counter() - start
            if elapsed >= limit:
                stopped_by = "minutes"
                break
            done = max(step / steps if steps else 0.0, elapsed / limit)
            for group in optimizer.param_groups:
                group["lr"] = opts.distill_lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
            ids = tokens[next(batches)]
            loss, terms = distillation_loss(dense, student, ids, opts.hidden)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            step, used = step + 1, used + ids.numel()
            stretch.append(terms)
            if step % every == 0 or step == steps:
                curve.append(_point(step, used, time.perf_counter() - start, stretch))
                stretch = []
            bar.update()
            bar.set_postfix_str(" ".join(f"{name} {value:.4g}" for name, value in terms.items()), refresh=False)
    if stretch:
        curve.append(_point(step, used, time.perf_counter() - start, stretch))
    return DistillRecord(step, used, time.perf_counter() - start, stopped_by, curve)


def _point(step: int, used: int, seconds: float, stretch: list[dict]) -> dict:
    """A curve point: where training stands, and each loss term's mean over the steps since the previous point."""
    means = {name: round(sum(terms[name] for terms in stretch) / len(stretch), 5) for name in stretch[0]}
    return {"step": step, "tokens": used, "seconds": round(seconds, 2), **means}
