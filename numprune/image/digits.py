"""The embedded image generator: a small LlamaGen trained on scikit-learn's handwritten digits.

No image model or data set can be downloaded here, but scikit-learn ships the UCI digits inside its
wheel: 1,797 images of 8x8 pixels with 17 grey levels (0..16), 10 classes. Each image is 64 tokens
in raster order with a vocabulary of 17, exactly LlamaGen's setting in miniature (a class token,
then a square grid of discrete image tokens), so the whole image pipeline (sampling with guidance,
self-generated calibration, pruning, image measures) runs on a real, trained generator in minutes
on a CPU. The default model is trained once with a fixed recipe and cached (``digits_model_folder``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from numprune.card import write_trained_card
from numprune.data.assets import cache_dir
from numprune.errors import NumpruneError
from numprune.evaluate.perplexity import summed_nll
from numprune.extras import need
from numprune.io.output import output_folder
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM

DIGITS_CLASSES = 10
DIGITS_LEVELS = 17  # grey levels 0..16: the token vocabulary
DIGITS_TOKENS = 64  # 8x8 pixels, raster order
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
TRAINING_REPORT = "training_report.json"
RECIPE_VERSION = 1  # bump when the default recipe changes, so a stale cached model is not reused
DIGITS_DESCRIPTION = f"LlamaGen digits generator (embedded: trained on scikit-learn's digits, recipe v{RECIPE_VERSION})"
DIGITS_LOADING = ("A class-conditional image generator (8x8 digits, 17 grey levels) with numprune's LlamaGen model class: "
                  "`import numprune`, then `AutoModelForCausalLM.from_pretrained(folder)`; "
                  "`numprune generate --model <folder> --grid samples.png` draws samples, `numprune prune --model <folder>` "
                  "prunes it.\n")

# The default recipe: a 6-layer, 128-wide LlamaGen (892k parameters) with grouped-query attention (4 query
# heads over 2 KV heads of 32 channels), 1,000 AdamW steps of 32 images (about 22 epochs).
DIGITS_ARCHITECTURE = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256, class_dropout_prob=0.1)
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 32
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 0.1
WARMUP_STEPS = 100


def digits_split() -> dict[str, torch.Tensor]:
    """The fixed train / held-out split: stratified by class, 20% held out, seed 0.

    Returns ``train_tokens`` / ``heldout_tokens`` (LongTensor ``[N, 64]``, values 0..16) and
    ``train_labels`` / ``heldout_labels`` (LongTensor ``[N]``, 0..9).
    """
    need("sklearn", "the handwritten digits")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    tokens = torch.from_numpy(digits.images.reshape(-1, DIGITS_TOKENS).round().astype("int64"))
    labels = torch.from_numpy(digits.target.astype("int64"))
    train, heldout = train_test_split(range(len(labels)), test_size=HELDOUT_FRACTION, stratify=digits.target,
                                      random_state=SPLIT_SEED)
    train, heldout = torch.tensor(train), torch.tensor(heldout)
    return {"train_tokens": tokens[train], "train_labels": labels[train],
            "heldout_tokens": tokens[heldout], "heldout_labels": labels[heldout]}


def tokens_to_images(tokens: torch.Tensor) -> torch.Tensor:
    """Digits tokens ``[N, 64]`` as grey images ``[N, 8, 8]`` in [0, 1] (the digits "tokenizer" decoder)."""
    tokens = torch.as_tensor(tokens)
    if tokens.shape[-1] != DIGITS_TOKENS:
        raise NumpruneError(f"digits images are {DIGITS_TOKENS} tokens, got {tokens.shape[-1]}")
    return tokens.reshape(-1, 8, 8).float() / (DIGITS_LEVELS - 1)


def digits_config(**overrides) -> LlamaGenConfig:
    """A LlamaGen config for the digits (17 tokens, 10 classes, an 8x8 grid); the default recipe's sizes."""
    return LlamaGenConfig(**{**DIGITS_ARCHITECTURE, **overrides, "vocab_size": DIGITS_LEVELS,
                             "num_classes": DIGITS_CLASSES, "image_tokens": DIGITS_TOKENS})


def sequences(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Model inputs ``[N, 65]``: the label, then the 64 pixel tokens."""
    return torch.cat([labels[:, None], tokens], dim=1)


def heldout_nll(model: LlamaGenForCausalLM) -> float:
    """Mean negative log-likelihood per image token (nats) of the held-out digits, given their class."""
    split = digits_split()
    tokens = split["heldout_tokens"]
    return summed_nll(model, sequences(tokens, split["heldout_labels"]), 128, progress=False) / tokens.numel()


def unigram_nll() -> float:
    """The baseline: held-out NLL per token under the training set's grey-level frequencies (add-one)."""
    split = digits_split()
    counts = torch.bincount(split["train_tokens"].reshape(-1), minlength=DIGITS_LEVELS).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[split["heldout_tokens"].reshape(-1)].mean().item()


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one CPU thread: float sums in another order (more threads) would give other weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_digits(config: LlamaGenConfig | None = None, steps: int = DEFAULT_STEPS, seed: int = 0, *,
                 batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                 progress: bool = True) -> tuple[LlamaGenForCausalLM, dict]:
    """Train a LlamaGen on the training digits; deterministic for a given config, steps and seed.

    AdamW (decay on matrices only), linear warm-up then cosine decay to zero, and class dropout
    (the label replaced by the null class with probability ``config.class_dropout_prob``) so the
    model also learns the unconditional distribution that classifier-free guidance needs.
    Returns the model (eval mode) and a report with the recipe, time and held-out NLL.
    """
    if steps < 1 or batch_size < 1:
        raise NumpruneError("steps and batch size must be positive integers")
    config = config or digits_config()
    if (config.vocab_size, config.num_classes, config.image_tokens) != (DIGITS_LEVELS, DIGITS_CLASSES, DIGITS_TOKENS):
        raise NumpruneError("a digits model needs vocab_size 17, num_classes 10 and image_tokens 64 (see digits_config)")
    split = digits_split()
    data = sequences(split["train_tokens"], split["train_labels"])
    with torch.random.fork_rng(devices=[]):  # the initial weights, leaving the caller's random state alone
        torch.manual_seed(seed)
        model = LlamaGenForCausalLM(config).train()
    generator = torch.Generator().manual_seed(seed)  # batches and class dropout
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, steps))
    start = time.perf_counter()
    order, cursor, losses = torch.randperm(len(data), generator=generator), 0, []
    with one_thread():
        for _ in tqdm(range(steps), desc="training digits", unit="step", disable=not progress):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            batch = data[order[cursor:cursor + batch_size]].clone()
            cursor += batch_size
            dropped = torch.rand(len(batch), generator=generator) < config.class_dropout_prob
            batch[dropped, 0] = config.num_classes
            loss = model(batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    report = {
        "recipe": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                   "warmup_steps": _warmup(steps), "schedule": "linear warm-up, cosine to 0",
                   "optimizer": "AdamW(betas=(0.9, 0.95)), grad clip 1.0",
                   "class_dropout_prob": config.class_dropout_prob},
        "split": {"train": len(data), "heldout": len(split["heldout_labels"]), "heldout_fraction": HELDOUT_FRACTION,
                  "stratified": True, "seed": SPLIT_SEED},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_nll": heldout_nll(model),
        "unigram_nll": unigram_nll(),
        "training_s": round(seconds, 1),
        "threads": 1,
    }
    return model, report


def _warmup(steps: int) -> int:
    return min(WARMUP_STEPS, max(steps // 10, 1))


def _warmup_cosine(step: int, steps: int) -> float:
    warmup = _warmup(steps)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(steps - warmup, 1))))


def save_digits_model(model: LlamaGenForCausalLM, report: dict, out: str | os.PathLike, overwrite: bool = False, *,
                      into_cache: bool = False) -> Path:
    """The model as a safetensors folder with its training report and model card, written atomically
    (``into_cache``: the default recipe's model, written into numprune's cache, where no other output may go)."""
    with output_folder(out, overwrite=overwrite, marker=TRAINING_REPORT, into_cache=into_cache) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        write_trained_card(tmp, report, "LlamaGen digits generator", DIGITS_LOADING)
    return Path(out)


def default_digits_folder() -> Path:
    """Where the default recipe's model is cached."""
    return cache_dir() / f"digits-llamagen-v{RECIPE_VERSION}-{DEFAULT_STEPS}steps-seed0"


def digits_model_folder(progress: bool = True) -> Path:
    """The embedded digits generator: trained once with the default recipe, then read from the cache."""
    folder = default_digits_folder()
    if not (folder / TRAINING_REPORT).is_file():
        model, report = train_digits(progress=progress)
        save_digits_model(model, report, folder, overwrite=True, into_cache=True)
    return folder
