"""The ``auto`` allocation: blend's per-layer widths at several weights, each measured on held-out text, the best kept.

``blend_schedule`` fixes the share of the global ranking's widths by the ratio alone, fitted on one
model; which share is right depends on the model too. ``auto`` decides per model at prune time: the
one calibration's statistics give every candidate (blend weights ``AUTO_WEIGHTS``: 0 is flap-widths,
1 is global), each is compensated from those same statistics, its fits applied to the model while it
is measured on held-out windows (masked: the removed inputs of the output projections zeroed, which
computes exactly what the shrunk model will), then undone. The candidate with the best score is the
plan and its fits the run's; the surgery is then that of ``blend`` at its weight.

Held-out windows are text the calibration never saw, by name (``holdout``): on the command line a
split of the calibration text disjoint from the calibration windows (numprune.data.corpora's
``held_out_windows``) and a few of the dense model's own samples (``holdout_windows``), so that a
narrow calibration text does not decide alone. Through the API a ``holdout`` may be given; without one,
the last ``1/HOLDOUT_SHARE`` of the calibration windows is held out (``split_holdout``).

The score (``SCORE``, chosen on validation texts: docs/method.md) is the geometric mean of the
held-out perplexities, or the mean KL divergence from the dense model's next-token distribution;
both are recorded for every candidate. The KL is taken over the dense model's ``TOP_K`` most
likely tokens at each position plus the rest of the vocabulary as one bin (a true divergence
between the two distributions so coarsened, and no more than the full one), so that the dense
reference costs ``TOP_K + 1`` numbers per token instead of a vocabulary's worth.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from numprune.adapters import LayerPlan, adapter_for
from numprune.compensate import LayerFits, applied
from numprune.data.corpora import held_out_windows
from numprune.data.self_generated import Sampling, self_generated_windows
from numprune.errors import NumpruneError
from numprune.pipeline import Compute, compensate
from numprune.recipe import MAX_SEED
from numprune.report import Clock
from numprune.sources import InMemory

SCORES = ("perplexity", "kl")
SCORE = "perplexity"  # chosen on validation texts (docs/method.md, "The auto allocation")
TOP_K = 64
# Held out on the command line: this many windows of this length from the calibration text's other
# passages, and as many of the model's own samples, drawn with the calibration seed + HOLDOUT_SEED_OFFSET
# (the self-generated validation text's default seed is the calibration seed + 1). 8 x 256, not 4 x 256:
# the smaller set chose unstably on SmolLM2 at 20% and on Gemma 3 at 30% (docs/method.md, the auto allocation).
HOLDOUT_WINDOWS, HOLDOUT_SEQLEN, HOLDOUT_SEED_OFFSET = 8, 256, 1000
HOLDOUT_SHARE = 8  # the API's fallback: the last 1/8 of the given calibration windows (at least one)


def holdout_windows(model, tokenizer, spec: str, nsamples: int, seqlen: int, seed: int,
                    sampling: Sampling = Sampling(), progress: bool = False, windows: int = HOLDOUT_WINDOWS,
                    length: int = HOLDOUT_SEQLEN) -> dict[str, tuple[torch.Tensor, dict]]:
    """The command line's held-out text for calibration ``spec`` drawn as ``calibration_windows(spec, nsamples,
    seqlen, seed)``: each text part's passages no calibration window touches, and the dense model's own samples
    (``windows`` of each, ``length`` tokens long or shorter than the calibration windows)."""
    if windows < 1 or length < 2:
        raise NumpruneError(f"held-out text needs at least one window of two or more tokens (got {windows} x {length})")
    length = min(length, max(2, seqlen - 1))  # the prompt token goes before a sample: seqlen - 1 fits the model
    held = held_out_windows(tokenizer, spec, nsamples, seqlen, seed, windows, length)
    samples, info = self_generated_windows(model, tokenizer, windows, length,
                                           seed=(seed + HOLDOUT_SEED_OFFSET) % (MAX_SEED + 1), side="held out",
                                           sampling=sampling, progress=progress)
    return {**held, "self": (samples, {**info, "windows": windows})}


def split_holdout(tokens: torch.Tensor | None, stats, holdout) -> tuple[torch.Tensor | None, dict]:
    """The calibration tokens and the held-out windows by name: ``holdout`` as given (a tensor is one set), else
    the last 1/HOLDOUT_SHARE of ``tokens``' windows, held out from the calibration."""
    if holdout is None:
        if stats is not None:
            raise NumpruneError("the auto allocation needs held-out windows when statistics are given (holdout=...): "
                                "the calibration tokens behind the statistics cannot be held out any more")
        if tokens is None or not torch.is_tensor(tokens) or tokens.dim() != 2 or len(tokens) < 2:
            raise NumpruneError("the auto allocation holds out some calibration windows: give at least two, "
                                "or held-out windows (holdout=...)")
        count = max(1, len(tokens) // HOLDOUT_SHARE)
        return tokens[:-count], {"calibration": (tokens[-count:], dict(source="calibration", side="held out",
                                                                       windows=count, seqlen=tokens.shape[1],
                                                                       last_windows_of=len(tokens)))}
    if torch.is_tensor(holdout):
        holdout = {"held-out": holdout}
    if not isinstance(holdout, dict) or not holdout:
        raise NumpruneError(f"holdout must be a tensor of token ids or a dict of them by name, got "
                            f"{type(holdout).__name__}")
    return tokens, {name: value if isinstance(value, tuple) else (value, {}) for name, value in holdout.items()}


def check_holdout(model: nn.Module, holdout: dict) -> None:
    """Every held-out set: an integer tensor [windows, length >= 2] of ids the model has."""
    vocab = model.get_input_embeddings().num_embeddings
    for name, (windows, _) in holdout.items():
        if (not torch.is_tensor(windows) or windows.is_floating_point() or windows.dtype == torch.bool
                or windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2):
            raise NumpruneError(f"held-out set {name!r} must be an integer tensor [windows, length >= 2] of token ids")
        if windows.min() < 0 or windows.max() >= vocab:
            raise NumpruneError(f"held-out set {name!r} holds ids outside 0..{vocab - 1}")


def choose(model: nn.Module, candidates: dict[float, list[LayerPlan]], stats, holdout: dict, opts,
           compute: Compute, clock: Clock) -> tuple[list[LayerPlan], list[LayerFits], dict]:
    """The best candidate's plans (by blend weight) and compensation fits (the run's, not computed again), and the
    record of every candidate's held-out figures.

    ``model`` is left as it came: each candidate's fits are applied to it while it is measured, then undone.
    """
    adapter = adapter_for(model)
    quiet = replace(compute, progress=False)
    with clock.timed("auto"):
        reference = {name: _dense_reference(model, windows) for name, (windows, _) in holdout.items()}
        rows, best_fits = [], {}
        for weight, plans in tqdm(candidates.items(), desc="auto allocation", unit="candidate",
                                  disable=not compute.progress):
            source = InMemory(model)
            compensate(source, plans, stats, None, opts, quiet, Clock())
            with ExitStack() as stack:  # the model computes what the candidate's narrower model would
                for i, (layer, fits) in enumerate(zip(adapter.layers(), source.fits)):
                    outputs = (adapter.attention_output(layer), adapter.mlp_output(layer))
                    stack.enter_context(applied(outputs, adapter.kept_inputs(i, plans[i]), fits))
                rows.append({"blend_weight": weight, **_measure(model, holdout, reference)})
            if min(rows, key=lambda row: row[SCORE]) is rows[-1]:  # the best so far: only its fits are kept
                best_fits = {weight: source.fits}
    best = min(rows, key=lambda row: row[SCORE])  # ties: the first, nearest flap-widths
    record = dict(score=SCORE, chosen_blend_weight=best["blend_weight"], candidates=rows,
                  holdout={name: {**info, "windows": int(w.shape[0]), "seqlen": int(w.shape[1])}
                           for name, (w, info) in holdout.items()},
                  time_s=round(clock.laps["auto"], 3))
    return candidates[best["blend_weight"]], best_fits[best["blend_weight"]], record


@torch.inference_mode()
def _dense_reference(model: nn.Module, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: the dense model's TOP_K most likely next tokens and the log-probabilities of those plus the rest."""
    out = []
    for logp in _log_probs(model, windows):
        top, index = logp.topk(min(TOP_K, logp.shape[-1] - 1), dim=-1)
        out.append((index, _binned(top)))
    return out


@torch.inference_mode()
def _measure(model: nn.Module, holdout: dict, reference: dict) -> dict:
    """Each held-out set's perplexity and KL from the dense model, and the two scores over the sets."""
    ppl, kl = {}, {}
    for name, (windows, _) in holdout.items():
        nll = div = 0.0
        for row, logp, (index, dense) in zip(windows, _log_probs(model, windows), reference[name]):
            nll -= logp.gather(-1, row[1:, None].to(logp.device)).double().sum().item()
            div += (dense.exp() * (dense - _binned(logp.gather(-1, index)))).sum().item()
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        ppl[name], kl[name] = math.exp(nll / tokens), div / tokens
    geometric = math.exp(sum(math.log(p) for p in ppl.values()) / len(ppl))
    return {"perplexity": geometric, "kl": sum(kl.values()) / len(kl), "perplexities": ppl, "kls": kl}


def _log_probs(model: nn.Module, windows: torch.Tensor):
    """Each window's next-token log-probabilities [length - 1, vocab] in float32, one window at a time."""
    device = model.get_input_embeddings().weight.device
    for row in windows:
        logits = model(row[None].to(device), use_cache=False).logits[0, :-1].float()
        yield torch.log_softmax(logits, dim=-1)


def _binned(top: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of chosen tokens [T, K] with the rest of the vocabulary's as a last column, in float64."""
    top = top.double()
    rest = torch.log1p(-top.exp().sum(-1).clamp_max(1 - 1e-12))
    return torch.cat([top, rest[:, None]], dim=-1)
