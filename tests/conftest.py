"""Shared by every test module (imported as ``conftest``, the one way): tiny random models of several shapes
and of every supported family, a tiny model folder, fresh-process reloading, and a controlled clock.

Test modules take their helpers from here or from ``hostile.py``, never from one another.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import numprune  # noqa: F401  (registers the per-layer classes)
from numprune.adapters import adapter_for
from numprune.compensate import apply
from numprune.data.assets import smollm2_folder
from numprune.pipeline import Compute, compensate, select
from numprune.recipe import PruneOptions
from numprune.report import Clock
from numprune.shrink import shrink
from numprune.sources import InMemory

# A run started as a background job of a shell without job control inherits SIGINT ignored, and so would every
# process the tests start: the Ctrl-C tests would then see their signal ignored. The tests need Python's own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=32, intermediate_size=48),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, intermediate_size=40),
    "odd": dict(num_attention_heads=5, num_key_value_heads=5, hidden_size=40, intermediate_size=45, head_dim=6),
    "gqa9": dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=36, intermediate_size=45, head_dim=4),
}


def tiny_llama(shape: str = "gqa", layers: int = 3, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, num_hidden_layers=layers, max_position_embeddings=128, tie_word_embeddings=True)
    config = LlamaConfig(**{**fields, **SHAPES[shape], **overrides})
    return break_symmetry(LlamaForCausalLM(config).eval())


def break_symmetry(model):
    """``model`` with its matrices redrawn: the default init is too symmetric for scores to differ between units."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def tiny_tokens(n: int = 6, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


COMMON = dict(vocab_size=97, num_hidden_layers=3, max_position_embeddings=128)
GQA = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=40)
# Gemma: head_dim apart from hidden / heads, sliding and full layers, soft-capping (Gemma 2).
GEMMA = dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40, head_dim=16,
             sliding_window=8, query_pre_attn_scalar=16,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
FAMILIES = {
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, **GQA)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, **GQA)),  # q/k/v biases
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, **{**GQA, "head_dim": 10})),  # q/k norms over head_dim
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(**COMMON, **GEMMA, attn_logit_softcapping=5.0,
                                               final_logit_softcapping=10.0)),
    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, **GEMMA)),
    "phi3": (Phi3ForCausalLM, Phi3Config(**COMMON, **GQA, pad_token_id=0, bos_token_id=1, eos_token_id=1)),  # fused
    "opt": (OPTForCausalLM, OPTConfig(**COMMON, hidden_size=32, num_attention_heads=4, ffn_dim=48, pad_token_id=1)),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=97, n_layer=3, n_positions=128, n_embd=32, n_head=4, n_inner=48)),
}


def tiny(family: str, seed: int = 0):
    """A tiny random model of ``family`` (a key of FAMILIES), its matrices redrawn as tiny_llama's; its config is
    a copy (a model's config is changed by e.g. ``set_attn_implementation``)."""
    torch.manual_seed(seed)
    model_class, config = FAMILIES[family]
    return break_symmetry(model_class(copy.deepcopy(config)).eval())


def pytest_runtest_setup(item):
    """A test marked ``cuda`` runs only where torch sees a GPU."""
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def tokens() -> torch.Tensor:
    return tiny_tokens()


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A tiny random LLaMA with the embedded SmolLM2 tokenizer, saved once as a plain HF folder (never written to)."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    tiny_llama("gqa9", layers=2, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def llama_cpp_present():
    """Skip without llama.cpp's bindings, except under CI (CI=true), where their absence is a failure."""
    from numprune.export import llamacpp

    if not llamacpp.available():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set: {llamacpp.INSTALL_HINT} (run `bash scripts/setup.sh --llama-cpp`)")
        pytest.skip(llamacpp.INSTALL_HINT + " (run `bash scripts/setup.sh --llama-cpp`)")


needs_llama_cpp = pytest.mark.usefixtures("llama_cpp_present")


@pytest.fixture
def one_thread():
    """One torch thread: a token step of a tiny model is too small to share, and on busy cores two threads wait on
    each other (sampling 16 tokens took 100x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeClock:
    """A stand-in for ``time.perf_counter`` whose readings are known: each reading moves on by the next of
    ``steps`` (cycled), and every reading is kept in ``readings``. Steps that are binary fractions
    (0.25, 0.5, ...) keep every difference exact."""

    def __init__(self, *steps: float):
        self.steps, self.now, self.readings = steps, 0.0, []

    def __call__(self) -> float:
        self.now += self.steps[len(self.readings) % len(self.steps)]
        self.readings.append(self.now)
        return self.now


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved while the test runs, as ``(figure, path)``: a plot is checked by what it draws."""
    saved, savefig = [], Figure.savefig

    def record(figure, path, *args, **kwargs):
        saved.append((figure, path))
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
probe = load_file(sys.argv[1])["probe"]
logits = {}
for i, folder in enumerate(sys.argv[3:]):
    if folder == "--import-numprune":
        import numprune
        continue
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits[str(len(logits))] = model(probe).logits.contiguous()
    print(type(model).__name__, "numprune" in sys.modules)
save_file(logits, sys.argv[2])
"""


def reload_all(plain: list[Path], with_numprune: list[Path], probe: torch.Tensor, tmp_path: Path):
    """Load ``plain`` folders, then ``import numprune`` and load ``with_numprune``, in one fresh process
    with AutoModelForCausalLM: [(logits, (class name, whether numprune was imported))], in that order."""
    save_file({"probe": probe}, tmp_path / "probe.safetensors")
    folders = [*map(str, plain), "--import-numprune", *map(str, with_numprune)]
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "probe.safetensors"),
                           str(tmp_path / "logits.safetensors"), *folders], capture_output=True, text=True, check=True)
    logits = load_file(tmp_path / "logits.safetensors")
    return [(logits[str(i)], tuple(line.split())) for i, line in enumerate(done.stdout.splitlines())]


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder, whichever way it is sharded."""
    return {name: t for shard in sorted(folder.glob("*.safetensors")) for name, t in load_file(shard).items()}


def stages(model, tokens, ratio=0.3, **options):
    """The pipeline's steps one by one, returning the masked model (a copy at full width with the fits applied and
    the removed inputs zeroed, numprune.compensate.apply), the shrunk one (built by numprune.shrink from the
    dense model and the fits) and the plans."""
    opts = PruneOptions.checked(ratio, **options)
    compute, clock = Compute(batch_size=4, progress=False), Clock()
    source = InMemory(model)
    plans, stats = select(source, tokens, None, opts, compute, clock)
    compensate(source, plans, stats, tokens, opts, compute, clock)
    masked = adapter_for(copy.deepcopy(model))
    for i, fits in enumerate(source.fits):
        layer = masked.layers()[i]
        for linear, keep, fit in zip((masked.attention_output(layer), masked.mlp_output(layer)),
                                     masked.kept_inputs(i, plans[i]), fits):
            apply(linear, keep, fit)
    return masked.model, shrink(source.adapter, plans, source.fits), plans


def assert_valid_groups(adapter, plans, gqa_unit):
    """Every kept KV head serves the same number of kept query heads; no layer is empty."""
    for i, plan in enumerate(plans):
        layout = adapter.attention_layout(i)
        kept_kv = set(plan.kv_heads)
        groups = [h // layout.group_size for h in plan.heads]
        assert set(groups) == kept_kv  # every kept query head has its KV head, and vice versa
        per_group = {g: groups.count(g) for g in kept_kv}
        assert len(set(per_group.values())) == 1  # equal query heads per KV head
        if gqa_unit == "query":
            assert len(plan.kv_heads) == layout.num_kv_heads
        assert plan.heads and plan.channels  # never empty
