"""Calibration that is not one text: the model's own samples (against a cache-free reference) and mixtures."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import tiny_llama

from numprune.data.corpora import calibration_parts, calibration_windows, evaluation_windows, mixture_counts
from numprune.data.self_generated import EVALUATION_WINDOWS, Sampling, sample_tokens
from numprune.errors import NumpruneError

PROMPT = 5


class CharTokenizer:
    """One token per character, so windows map back to text; BOS is PROMPT for self-generated text."""

    bos_token_id, eos_token_id = PROMPT, None

    def __call__(self, texts, add_special_tokens, verbose):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def convert_ids_to_tokens(self, token):
        return chr(token)


def text_of(ids: torch.Tensor) -> str:
    return "".join(map(chr, ids.tolist()))


@pytest.fixture(scope="module")
def model():
    return tiny_llama("gqa", layers=2)


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Every test here samples token by token from a tiny model (see conftest.one_thread)."""


@pytest.fixture
def texts(tmp_path):
    """Two files in disjoint alphabets (lower-case letters / digits and capitals), so a window tells its source."""
    lower = tmp_path / "lower.txt"
    lower.write_text(" ".join(f"word{i} is lower" for i in range(200)), encoding="utf-8")
    upper = tmp_path / "upper.txt"
    upper.write_text(" ".join(f"ONLY CAPITALS HERE {'XYZ'[i % 3]}" for i in range(200)), encoding="utf-8")
    return lower, upper


@torch.inference_mode()
def reference_samples(model, samples: int, length: int, seed: int, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling written from the definitions, in float64, re-reading the whole prefix at every step (no cache).

    Top-p keeps a token when the mass of the tokens no likelier than it exceeds 1 - top_p; the token
    is the first whose cumulative kept mass, in vocabulary order, exceeds the sample's uniform number.
    """
    model = copy.deepcopy(model).double()
    uniform = torch.rand(samples, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = torch.empty(samples, length, dtype=torch.long)
    for i in range(samples):
        prefix = [PROMPT]
        for t in range(length):
            logits = model(torch.tensor([prefix])).logits[0, -1]
            probs = (logits / temperature).softmax(-1)
            tail = torch.stack([probs[probs <= p].sum() for p in probs])
            kept = torch.where(tail > 1 - top_p, probs, torch.zeros_like(probs))
            cdf = kept.cumsum(-1) / kept.sum()
            token = int((cdf <= uniform[i, t]).sum())
            out[i, t] = token
            prefix.append(token)
    return out


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_samples_equal_a_step_by_step_reference_without_cache(model, temperature, top_p):
    sampling = Sampling(temperature=temperature, top_p=top_p, batch_size=3)
    tokens = sample_tokens(model, 5, 12, prompt=PROMPT, seed=4, sampling=sampling)
    assert torch.equal(tokens, reference_samples(model, 5, 12, 4, temperature, top_p))


def test_self_generated_calibration_is_deterministic_for_a_seed(model):
    tokenizer = CharTokenizer()
    windows, info = calibration_windows(tokenizer, "self", 6, 16, seed=3, model=model)
    again, _ = calibration_windows(tokenizer, "self", 6, 16, seed=3, model=model, sampling=Sampling(batch_size=4))
    other, _ = calibration_windows(tokenizer, "self", 6, 16, seed=4, model=model)
    assert windows.shape == (6, 16) and torch.equal(windows, again)  # another batch size, same tokens
    assert (windows != other).any(dim=1).all()  # every sample differs under another seed
    assert info["seed"] == 3 and info["temperature"] == 1.0 and info["top_p"] == 0.95
    assert info["prompt_token"] == PROMPT and info["nsamples"] == 6 and info["sampling_s"] >= 0

    held_out, protocol = evaluation_windows(tokenizer, "self", 16, model=model, seed=7)
    assert held_out.shape == (EVALUATION_WINDOWS, 16) and protocol["seed"] == 7 and protocol["side"] == "evaluation"
    assert torch.equal(held_out, sample_tokens(model, EVALUATION_WINDOWS, 16, prompt=PROMPT, seed=7))
    assert not any(torch.equal(row, w) for row in held_out for w in windows)


def brute_force_counts(weights: list[float], n: int) -> list[int]:
    """The count vector (sum n) closest to the exact quotas in L1, found among all of them."""
    quotas = [n * w / sum(weights) for w in weights]
    vectors = (c for c in itertools.product(range(n + 1), repeat=len(weights)) if sum(c) == n)
    return list(min(vectors, key=lambda c: sum(abs(ci - qi) for ci, qi in zip(c, quotas))))


@pytest.mark.parametrize("weights,n", [([3, 1], 9), ([1, 2, 4], 11), ([0.5, 1.7, 1], 9), ([5, 1.5, 2, 1], 13)])
def test_mixture_counts_are_the_closest_to_the_quotas(weights, n):
    assert mixture_counts(weights, n) == brute_force_counts(weights, n)


def test_equal_shares_give_leftovers_to_the_first_parts():
    assert mixture_counts([1, 1, 1], 128) == [43, 43, 42]
    assert mixture_counts([1, 1], 7) == [4, 3]


def test_weights_whose_sum_overflows_share_as_their_ratios_say(texts):
    assert mixture_counts([1e308, 1e308], 7) == [4, 3] and mixture_counts([1e308, 1e308 / 3], 8) == [6, 2]
    lower, upper = texts
    huge, info = calibration_windows(CharTokenizer(), f"{lower}:1e308+{upper}:1e308", 5, 12, seed=2)
    assert torch.equal(huge, calibration_windows(CharTokenizer(), f"{lower}+{upper}", 5, 12, seed=2)[0])
    assert [p["weight"] for p in info["mixture"]] == [1e308, 1e308] and [p["nsamples"] for p in info["mixture"]] == [3, 2]


def test_mixture_windows_come_from_their_sources(texts, model):
    lower, upper = texts
    tokenizer = CharTokenizer()
    spec = f"{lower}:3+{upper}"
    windows, info = calibration_windows(tokenizer, spec, 8, 12, seed=2)
    assert windows.shape == (8, 12)
    assert [p["nsamples"] for p in info["mixture"]] == [6, 2] and [p["share"] for p in info["mixture"]] == [0.75, 0.25]
    assert [p["weight"] for p in info["mixture"]] == [3.0, 1.0] and info["tokens_used"] == 8 * 12
    lower_text, upper_text = lower.read_text(), upper.read_text()
    assert all(text_of(w) in lower_text and text_of(w) not in upper_text for w in windows[:6])
    assert all(text_of(w) in upper_text and text_of(w) not in lower_text for w in windows[6:])

    mixed, info = calibration_windows(tokenizer, f"self+{upper}", 5, 12, seed=2, model=model)
    assert [p["source"] for p in info["mixture"]] == ["self", str(upper)]
    assert torch.equal(mixed[:3], sample_tokens(model, 3, 12, prompt=PROMPT, seed=2))
    assert all(text_of(w) in upper_text for w in mixed[3:])


@pytest.mark.parametrize("spec,message", [
    ("sotu+nosuch", "unknown text source 'nosuch'"),
    ("sotu:0+emails", "bad weight '0' for 'sotu'"),
    ("sotu:-2+emails", "bad weight '-2'"),
    ("sotu:many+emails", "bad weight 'many'"),
    ("sotu+sotu", "names a source twice"),
    ("sotu++emails", "empty part"),
    ("missing.txt+sotu", "no text file at missing.txt"),
])
def test_bad_mixtures_are_refused_before_any_reading(spec, message):
    with pytest.raises(NumpruneError, match=message):
        calibration_parts(spec)


def test_file_names_keep_their_plus_and_colon(tmp_path):
    alone = tmp_path / "a+b:2.txt"
    alone.write_text("text")
    assert calibration_parts(str(alone)) == [(str(alone), 1.0)]
    part = tmp_path / "c:2.txt"
    part.write_text("text")
    assert calibration_parts(f"{part}+sotu:0.5") == [(str(part), 1.0), ("sotu", 0.5)]
    assert calibration_parts(f"{part}:3+sotu") == [(str(part), 3.0), ("sotu", 1.0)]


def test_self_needs_the_model_and_leaves_no_window_empty(texts):
    lower, upper = texts
    with pytest.raises(NumpruneError, match="needs the model"):
        calibration_windows(CharTokenizer(), "self", 2, 8)
    with pytest.raises(NumpruneError, match="leave none for"):
        calibration_windows(CharTokenizer(), f"{lower}:9+{upper}", 4, 8)
    with pytest.raises(NumpruneError, match="a mixture is for calibration"):
        evaluation_windows(CharTokenizer(), f"{lower}+{upper}", 8)
