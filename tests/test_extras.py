"""The lean install: numprune imports and prunes without any extra, and each extra's feature, used without it,
is refused in one line that names the extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from numprune.extras import OPTIONAL

TESTS = Path(__file__).parent

# A fresh process where every extra's modules cannot be imported (as after `pip install numprune`): None in
# sys.modules makes `import x` raise ModuleNotFoundError and importlib.util.find_spec report it missing.
WITHOUT_EXTRAS = textwrap.dedent(f"""
    import sys
    for name in {sorted(OPTIONAL)!r}:
        sys.modules[name] = None
    import numprune
    from numprune.errors import NumpruneError
    """)


def run_without_extras(body: str) -> subprocess.CompletedProcess:
    script = WITHOUT_EXTRAS + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=TESTS, capture_output=True, text=True, timeout=300)


def test_numprune_prunes_and_saves_without_any_extra(tmp_path):
    done = run_without_extras(f"""
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
        tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
        pruned, report = numprune.prune(model, tokens, ratio=0.3, progress=False)
        numprune.save_pruned(pruned, None, report, {str(tmp_path / "out")!r})
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r})
        loaded = sorted(name for name in {sorted(OPTIONAL)!r} if sys.modules.get(name) is not None)
        print("pruned", report["parameters"]["achieved_ratio"] > 0.25, loaded)
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "pruned True []"


# Each extra's feature, and the line that refuses it without the extra.
FEATURES = {
    "from numprune.evaluate.zeroshot import load_tasks\nload_tasks(['arc_easy'])":
        "zero-shot evaluation needs lm-eval, which is not installed: pip install 'numprune[eval]'",
    "from numprune.data.corpora import get_source\nget_source('wikitext2').calibration_text()":
        "loading wikitext2 needs datasets, which is not installed: pip install 'numprune[data]'",
    "from numprune.image.digits import digits_split\ndigits_split()":
        "the handwritten digits needs scikit-learn, which is not installed: pip install 'numprune[data]'",
    "from numprune.compare import plot\nplot({}, None, 'unused.png')":
        "the plot needs matplotlib, which is not installed: pip install 'numprune[plots]'",
    "from numprune.export import llamacpp\nllamacpp.quantize('in.gguf', 'out.gguf', 'q8_0')":
        "measuring in llama.cpp needs llama-cpp-python, which is not installed: pip install 'numprune[llamacpp]'",
}


def test_each_missing_extra_is_one_line_naming_it():
    tries = "".join("try:\n" + textwrap.indent(call, "    ") + "\nexcept NumpruneError as error:\n    print(error)\n"
                    for call in FEATURES)
    done = run_without_extras(tries)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == list(FEATURES.values())


def test_the_command_line_refuses_a_missing_extra_before_loading(tmp_path):
    done = run_without_extras(f"""
        from numprune.cli import main
        sys.exit(main(["compare", "--model", "no-such-model", "--out", {str(tmp_path / "out")!r}]))
        """)
    assert done.returncode == 2
    assert done.stderr.strip() == ("numprune: error: compare's plot needs matplotlib, which is not installed: "
                                   "pip install 'numprune[plots]'")
    assert not (tmp_path / "out").exists()
