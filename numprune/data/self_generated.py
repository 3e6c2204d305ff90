"""Text the language model samples itself: calibration without any data set, and held-out validation text.

Each sample starts from one prompt token, the tokenizer's BOS token (its EOS token if it has no
BOS): the token that opens a sequence conditions on nothing, so the samples follow the model's own
unconditional distribution. (A first token drawn uniformly from the vocabulary was the other
candidate; most of a vocabulary is rare sub-word pieces, so it would open most samples on text the
model itself would hardly write.) The prompt is not part of the returned windows, which, like
corpus windows, hold no special token at position 0; an end-of-text token the model samples stays
in, and the sample goes on past it as a corpus goes on into its next document.

Generation is batched with a KV cache (``transformers.DynamicCache``) in a plain loop, one forward
per position; tokens are picked by ``numprune.sampling`` (temperature, top-p, the seeded
inverse-CDF draw). What holds for a seed: the same seed, batch size and machine give the same
tokens; another batch size gives each sample the same random numbers, so it agrees too unless the
float rounding of the other batch shape moves a CDF boundary across a sample's number (rare; that
sample then diverges from there on).

Calibration and validation text are sampled with different seeds (the caller passes them; the
command line's defaults are 0 and 1), so the validation text is held out from calibration.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from numprune.errors import NumpruneError
from numprune.sampling import check_warping, pick_tokens, uniform_draws

SELF = "self"
# Held-out validation windows generated when the caller does not cap the count: 8 as in our tables.
EVALUATION_WINDOWS = 8


@dataclass(frozen=True)
class Sampling:
    """How the model samples its own text; recorded with the windows.

    Temperature 1 keeps the model's distribution; top-p 0.95 cuts the far tail (at most 5% of the
    mass per step), whose rare tokens can derail a 512-token sample into text no input looks like.
    """

    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 64

    def check(self) -> None:
        check_warping(self.temperature, 0, self.top_p)
        if self.batch_size < 1:
            raise NumpruneError(f"sampling batch size must be a positive integer, got {self.batch_size}")


def prompt_token(tokenizer) -> int:
    """The token every sample starts from: BOS, else EOS (see the module docstring)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise NumpruneError("the tokenizer has neither a BOS nor an EOS token to start self-generated text from")
    return int(token)


@torch.inference_mode()
def sample_tokens(model, samples: int, length: int, *, prompt: int, seed: int, sampling: Sampling = Sampling(),
                  progress: bool = False) -> torch.Tensor:
    """``[samples, length]`` token ids (CPU LongTensor) the model samples after ``prompt``, which is not included."""
    sampling.check()
    if samples < 1 or length < 1:
        raise NumpruneError(f"need at least one sample of at least one token (got {samples} x {length})")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length + 1 > limit:
        raise NumpruneError(f"cannot sample {length} tokens after the prompt: the model's positions end at {limit}")
    uniform = uniform_draws(samples, length, seed)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    out = torch.empty(samples, length, dtype=torch.long)
    bar = tqdm(total=samples * length, desc="self-generating", unit="tok", disable=not progress)
    try:
        for start in range(0, samples, sampling.batch_size):
            rows = min(sampling.batch_size, samples - start)
            cache = DynamicCache(config=model.config)
            token = torch.full((rows,), prompt, dtype=torch.long, device=device)
            for t in range(length):
                logits = model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1]
                token = pick_tokens(logits, uniform[start:start + rows, t].to(device), sampling.temperature, 0,
                                    sampling.top_p)
                out[start:start + rows, t] = token.cpu()
                bar.update(rows)
            del cache
    finally:
        bar.close()
        model.train(was_training)
    return out


def self_generated_windows(model, tokenizer, nsamples: int, seqlen: int, *, seed: int, side: str,
                           sampling: Sampling = Sampling(), progress: bool = False) -> tuple[torch.Tensor, dict]:
    """``nsamples`` self-generated windows of ``seqlen`` tokens and the record of how they were made.

    ``side`` ("calibration" or "evaluation") only labels the record; the seed is what keeps the
    two apart.
    """
    prompt = prompt_token(tokenizer)
    start = time.perf_counter()
    tokens = sample_tokens(model, nsamples, seqlen, prompt=prompt, seed=seed, sampling=sampling, progress=progress)
    seconds = time.perf_counter() - start
    protocol = dict(source=SELF, side=side, special_tokens=False, prompt_token=prompt,
                    prompt=tokenizer.convert_ids_to_tokens(prompt), **asdict(sampling), seed=seed, seqlen=seqlen,
                    sampling_s=round(seconds, 2), sampling_tokens_per_s=round(tokens.numel() / max(seconds, 1e-9), 1),
                    sampling_threads=torch.get_num_threads())
    return tokens, protocol
