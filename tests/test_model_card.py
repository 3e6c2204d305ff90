"""Every model folder numprune writes carries a model card that huggingface_hub reads back, and records
numprune's version; ``numprune --version`` says it."""

import importlib.metadata
import json
import re

import pytest
from conftest import tiny_llama, tiny_tokens
from hostile import numprune
from huggingface_hub import ModelCard

from numprune.api import prune
from numprune.card import write_pruned_card
from numprune.cli import main
from numprune.data.assets import smollm2_folder
from numprune.image.digits import digits_config, save_digits_model, train_digits
from numprune.models import load_model
from numprune.recipe import PruneOptions
from numprune.save import REPORT_NAME, save_pruned
from numprune.stream import prune_streaming

VERSION = importlib.metadata.version("numprune")


def card_of(folder):
    card = ModelCard.load(folder / "README.md")
    return card, card.data.to_dict()


def recipe_in(card) -> str:
    """The recipe line the card shows in its code block after 'The whole recipe'."""
    return re.search(r"The whole recipe.*?```\n(.+?)\n```", card.text, re.S)[1]


@pytest.mark.parametrize("allocation,plain", [("uniform", True), ("global", False)])
def test_saved_folder_card_says_how_it_was_pruned_and_how_to_load_it(allocation, plain, tmp_path):
    pruned, report = prune(tiny_llama("gqa"), tiny_tokens(), ratio=0.35, allocation=allocation, progress=False,
                           score_options={"iterations": 3})
    out = save_pruned(pruned, None, report, tmp_path / "out")
    card, data = card_of(out)
    assert data["library_name"] == "transformers" and {"numprune", "pruned"} <= set(data["tags"])
    assert "base_model" not in data and "license" not in data  # the tiny model has no card to carry them from
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["numprune_version"] == VERSION == report.numprune_version
    assert f"numprune {VERSION}" in card.text and f"`{report.method}`" in card.text
    assert f"achieved {saved['parameters']['achieved_ratio']:.4f}" in card.text
    assert f"{saved['parameters']['total_before']:,} -> {saved['parameters']['total_after']:,}" in card.text
    assert PruneOptions.parse(recipe_in(card), 0.35) == report.options  # the recipe reads back as the run's options
    assert ("import numprune" in card.text) is not plain and "numprune export" in card.text
    assert "Nothing in this run" in card.text


def test_a_report_without_a_pruning_record_still_gives_a_card(tmp_path):
    out = save_pruned(tiny_llama("gqa"), None, {}, tmp_path / "out")
    card, data = card_of(out)
    assert {"numprune", "pruned"} <= set(data["tags"]) and "records no pruning run" in card.text
    assert "How it was pruned" not in card.text and "model_type" in card.text


def test_card_carries_base_model_license_and_terms_from_the_source(tmp_path):
    """A folder from the hub's cache is its hub id; its card's license and gated terms travel; pruning the pruned
    folder again keeps naming the original model."""
    source = tmp_path / "hub" / "models--acme--tiny-lm" / "snapshots" / "0123abc"
    tiny_llama("gqa").save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: other\nlicense_name: acme-terms\nlicense_link: https://acme.example/"
                                      "terms\nextra_gated_prompt: Agree to the ACME terms.\nbase_model: acme/parent\n"
                                      "tags:\n- text-generation\n---\n# tiny\n")
    model = load_model(str(source))[0]
    pruned, report = prune(model, tiny_tokens(), ratio=0.3, progress=False)
    first = save_pruned(pruned, None, report, tmp_path / "first")
    _, data = card_of(first)
    assert data["base_model"] == "acme/tiny-lm"
    assert (data["license"], data["license_name"], data["license_link"], data["extra_gated_prompt"]) == (
        "other", "acme-terms", "https://acme.example/terms", "Agree to the ACME terms.")
    again, report = prune(load_model(str(first))[0], tiny_tokens(), ratio=0.2, progress=False)
    _, data = card_of(save_pruned(again, None, report, tmp_path / "second"))
    assert data["base_model"] == "acme/tiny-lm" and data["license"] == "other"


@pytest.mark.parametrize("text", ["---\nlicense: [unclosed\n---\n", "---\n- a list\n---\n", b"---\n\xff\xfe\n---\n"])
def test_an_unreadable_source_card_is_left_out(tmp_path, text):
    source = tmp_path / "source"
    tiny_llama("gqa").save_pretrained(source)
    (source / "README.md").write_bytes(text if isinstance(text, bytes) else text.encode())
    pruned, report = prune(load_model(str(source))[0], tiny_tokens(), ratio=0.3, progress=False)
    _, data = card_of(save_pruned(pruned, None, report, tmp_path / "out"))
    assert "license" not in data and "numprune" in data["tags"]


def test_embedded_model_card_names_its_hub_model_and_license(tmp_path):
    pruned, report = prune(tiny_llama("gqa"), tiny_tokens(), ratio=0.3, progress=False)
    write_pruned_card(tmp_path, report, str(smollm2_folder()))
    _, data = card_of(tmp_path)
    assert (data["base_model"], data["license"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")


def test_hub_id_is_the_base_model_and_a_missing_folder_is_not(tmp_path):
    pruned, report = prune(tiny_llama("gqa"), tiny_tokens(), ratio=0.3, progress=False)
    write_pruned_card(tmp_path, report, "acme/tiny-lm")
    assert card_of(tmp_path)[1]["base_model"] == "acme/tiny-lm"
    write_pruned_card(tmp_path, report, str(tmp_path / "gone"))
    assert "base_model" not in card_of(tmp_path)[1]


def test_command_line_card_shows_the_runs_own_figures(tiny_model_folder, tmp_path):
    out = tmp_path / "pruned"
    done = numprune("prune", "--model", tiny_model_folder, "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
                    "--out", out, "--eval", "moby-dick", "--eval-seqlen", "32", "--eval-windows", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    card, data = card_of(out)
    measured = json.loads((out / REPORT_NAME).read_text())["perplexity"]["moby-dick"]
    assert f"| perplexity | moby-dick | {measured['dense']:.4g} | {measured['pruned']:.4g} |" in card.text
    assert f"| source | {tiny_model_folder.resolve()} |" in card.text
    assert ("| healing | distillation from the dense model's next-token distribution, 128 calibration "
            "tokens |") in card.text  # the default method's healing, one pass over 4 x 32 tokens


def test_streamed_folder_has_the_same_card(tmp_path):
    source = tmp_path / "hub" / "models--acme--tiny-lm" / "snapshots" / "0123abc"
    tiny_llama("gqa").save_pretrained(source)
    report = prune_streaming(source, tiny_tokens(), ratio=0.3, out=tmp_path / "out", progress=False)
    card, data = card_of(tmp_path / "out")
    assert data["base_model"] == "acme/tiny-lm" and "numprune" in data["tags"]
    assert PruneOptions.parse(recipe_in(card), 0.3) == report.options
    assert "| healing | block-local: each layer fitted to the dense layer's output (" in card.text  # streamed
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["numprune_version"] == VERSION


def test_trained_and_pruned_image_generator_folders_have_cards(tmp_path):
    model, report = train_digits(digits_config(), steps=2, progress=False)
    out = save_digits_model(model, report, tmp_path / "digits")
    card, data = card_of(out)
    assert "numprune" in data["tags"] and f"numprune {VERSION}" in card.text
    assert f'"heldout_nll": {report["heldout_nll"]}' in card.text
    assert main(["prune", "--model", str(out), "--ratio", "0.2", "--calib-per-class", "1", "--out",
                 str(tmp_path / "pruned"), "--quiet"]) == 0
    card, data = card_of(tmp_path / "pruned")
    calibration = json.loads((tmp_path / "pruned" / REPORT_NAME).read_text())["calibration"]
    assert f"| calibration | self-generated, {calibration['tokens']} tokens, seed 0 |" in card.text
    assert "pruned" in data["tags"] and "import numprune" in card.text


def test_version_flag():
    done = numprune("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"numprune {VERSION}"
