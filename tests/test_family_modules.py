"""A family is one module of numprune/families: importing it is all numprune needs to prune, save and reload it."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import break_symmetry, tiny_tokens
from transformers import AutoModelForCausalLM

import numprune.families
from numprune.adapters import adapter_for, register, registered, supported_model_types
from numprune.adapters.stock import StockAdapter
from numprune.api import prune
from numprune.errors import NumpruneError
from numprune.families import import_modules
from numprune.families.llama import LlamaAdapter
from numprune.save import save_pruned

NEW_PACKAGE = "new_families"
# A family transformers does not have: LLaMA's classes under another model type, written as one module
# the way a file in numprune/families is (its stock classes register themselves, as transformers' do).
NEW_FAMILY = '''
"""Toy: LLaMA's layout under its own model type."""

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.per_layer import Family


class ToyConfig(LlamaConfig):
    model_type = "toy"


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig


AutoConfig.register(ToyConfig.model_type, ToyConfig)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM)


@register
class ToyAdapter(StockAdapter):
    spec = Family("Toy", "toy", ToyConfig, ToyForCausalLM, LlamaDecoderLayer)
'''
PROBE = tiny_tokens(3, 20, seed=7)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The new family's module, found in its package by the same discovery as numprune/families'."""
    root = tmp_path_factory.mktemp("families")
    (root / NEW_PACKAGE).mkdir()
    (root / NEW_PACKAGE / "__init__.py").write_text("")
    (root / NEW_PACKAGE / "toy.py").write_text(NEW_FAMILY)
    sys.path.insert(0, str(root))
    try:
        (module,) = import_modules(NEW_PACKAGE, [str(root / NEW_PACKAGE)])
    finally:
        sys.path.remove(str(root))
    return module


def test_every_module_in_the_package_registers_one_family():
    files = sorted(p.stem for p in Path(numprune.families.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert [m.__name__ for m in numprune.families.MODULES] == [f"numprune.families.{f}" for f in files]
    ours = [a for a in registered() if not a.__module__.startswith(NEW_PACKAGE)]
    assert Counter(a.__module__ for a in ours) == Counter(m.__name__ for m in numprune.families.MODULES)
    assert {"llama", "numprune_llama", "gpt2", "numprune_llamagen"} <= set(supported_model_types())
    assert set(supported_model_types()) == {t for a in registered() for t in a.model_types}


def test_a_model_type_has_one_family():
    again = type("LlamaAgain", (StockAdapter,), {"spec": LlamaAdapter.spec})
    with pytest.raises(NumpruneError) as error:
        register(again)
    assert str(error.value) == "model type 'llama' already belongs to LlamaAdapter; LlamaAgain cannot register it again"
    assert again not in registered()


@pytest.mark.parametrize("allocation,saved_as", [("uniform", "ToyForCausalLM"), ("global", "NumpruneToyForCausalLM")])
def test_a_new_family_module_prunes_saves_and_reloads(toy, allocation, saved_as, tokens, tmp_path):
    torch.manual_seed(0)
    config = toy.ToyConfig(vocab_size=97, num_hidden_layers=3, max_position_embeddings=128, hidden_size=48,
                           num_attention_heads=6, num_key_value_heads=2, intermediate_size=40)
    model = break_symmetry(toy.ToyForCausalLM(config).eval())
    assert type(adapter_for(model)) is toy.ToyAdapter
    pruned, report = prune(model, tokens, ratio=0.3, allocation=allocation, progress=False)
    assert type(pruned).__name__ == saved_as
    folder = save_pruned(pruned, None, report, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded).__name__ == saved_as
    assert parameters(reloaded) == parameters(pruned) < parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, pruned(PROBE).logits)
