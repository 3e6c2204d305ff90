"""Image measures against direct computations: Fréchet distance, the digits classifier, class accuracy,
held-out NLL, the PNG grid, and the generate / compare commands on a tiny image generator."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from numprune.cli import main
from numprune.evaluate.image import (class_accuracy, digits_classifier, frechet_distance, frechet_distance_from_stats,
                                     heldout_nll, train_classifier)
from numprune.image.grid import grid_image, parse_classes, save_png
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM


def tiny_digits_generator(seed: int = 0, layers: int = 2) -> LlamaGenForCausalLM:
    """A random LlamaGen shaped like the digits model: 10 classes, 17 grey levels, 8x8 tokens."""
    torch.manual_seed(seed)
    config = LlamaGenConfig(vocab_size=17, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=48, num_classes=10, image_tokens=64)
    model = LlamaGenForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def random_covariance(rng, n):
    a = rng.normal(size=(n, n))
    return a @ a.T + 0.1 * np.eye(n)


# --- Fréchet distance -------------------------------------------------------------------------------------

def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    var_a, var_b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_matches_sqrtm_of_the_product_for_full_covariances():
    rng = np.random.default_rng(1)
    cov_a, cov_b = random_covariance(rng, 6), random_covariance(rng, 6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    direct = (((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(direct, rel=1e-8)
    # Scaling both covariances by s scales the covariance part of the distance by s.
    part = frechet_distance_from_stats(mu_a, cov_a, mu_a, cov_b)
    assert frechet_distance_from_stats(mu_a, 4 * cov_a, mu_a, 4 * cov_b) == pytest.approx(4 * part, rel=1e-8)


def test_frechet_distance_of_samples_uses_their_mean_and_covariance_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(loc=1.0, size=(200, 4))
    stats = frechet_distance_from_stats(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(stats, rel=1e-12)
    assert abs(frechet_distance(a, a)) < 1e-8
    # Fewer samples than features: rank-deficient covariances still give a real, finite, ~0 self-distance
    # (the square roots of rounding-level eigenvalues leave ~1e-7).
    few = rng.normal(size=(5, 12))
    assert abs(frechet_distance(few, few)) < 1e-5
    assert frechet_distance(a, b) > 0.5


# --- classifier, class accuracy ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from numprune.image.digits import digits_split, tokens_to_images

    split = digits_split()
    return (tokens_to_images(split["train_tokens"]), split["train_labels"],
            tokens_to_images(split["heldout_tokens"]), split["heldout_labels"])


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier()  # trained on the train split on first use, then read from the cache


def test_classifier_is_deterministic_and_accurate_on_the_heldout_split(digits, classifier):
    train_images, train_labels, heldout_images, heldout_labels = digits
    again = train_classifier(train_images, train_labels)  # the same weights as the cached classifier's
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values()))
    assert class_accuracy(classifier, heldout_images, heldout_labels) > 0.95  # measured: 0.98 or more


def test_class_accuracy_counts_images_assigned_to_their_requested_class(digits, classifier):
    _, _, images, labels = digits
    requested = labels[:60].clone()
    requested[::3] = (requested[::3] + 1) % 10  # a third of the requests are wrong on purpose
    direct = sum(int(classifier(images[i:i + 1]).argmax()) == int(requested[i]) for i in range(60)) / 60
    assert class_accuracy(classifier, images[:60], requested) == pytest.approx(direct)
    assert direct < 0.7


# --- held-out NLL -----------------------------------------------------------------------------------------

def test_heldout_nll_equals_the_product_of_next_token_probabilities_prefix_by_prefix():
    model = tiny_digits_generator()
    tokens = torch.randint(0, 17, (3, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 7, 2])
    total = 0.0
    with torch.inference_mode():
        for image, label in zip(tokens, labels):
            for t in range(64):  # the model sees the label and the first t tokens only
                ids = torch.cat([label[None], image[:t]])[None]
                total -= torch.log_softmax(model(ids).logits[0, -1].double(), -1)[image[t]].item()
    result = heldout_nll(model, tokens, labels, batch_size=2)
    assert result["nll"] == pytest.approx(total / tokens.numel(), rel=1e-5)
    assert result["bits"] == pytest.approx(result["nll"] / math.log(2))
    assert result["tokens"] == 3 * 64


# --- pictures and commands --------------------------------------------------------------------------------

def test_grid_png_has_the_exact_pixel_size_and_content(tmp_path):
    images = torch.rand(3, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    path = save_png(grid_image(images, scale=4, pad=2), tmp_path / "grid.png")
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape == (3 * (8 * 4 + 2) + 2, 5 * (8 * 4 + 2) + 2, 3)
    top, left = 2 + 1 * 34, 2 + 4 * 34  # row 1, column 4, its pixel (5, 6), enlarged 4x
    assert pixels[top + 5 * 4 + 3, left + 6 * 4, 0] == round(float(images[1, 4, 5, 6]) * 255)
    assert (pixels[:2] == 255).all()  # the padding


def test_parse_classes():
    assert parse_classes("0-3,7", 10) == [0, 1, 2, 3, 7]
    for bad in ("0-10", "x", "-1"):
        with pytest.raises(Exception, match="classes"):
            parse_classes(bad, 10)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-image")
    tiny_digits_generator().save_pretrained(folder)
    return folder


def test_generate_writes_a_grid_of_classes_by_samples(tiny_folder, tmp_path, capsys):
    out = tmp_path / "samples.png"
    assert main(["generate", "--model", str(tiny_folder), "--classes", "0-2,5", "--per-class", "3", "--seed", "1",
                 "--cfg-scale", "2", "--scale", "2", "--grid", str(out), "--quiet"]) == 0
    assert "generated 12 images" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.size == (3 * (8 * 2 + 2) + 2, 4 * (8 * 2 + 2) + 2)
    assert main(["generate", "--model", str(tiny_folder), "--classes", "0-10", "--grid", str(out)]) == 2


def test_compare_on_an_image_generator_reports_image_measures_and_writes_the_samples_side_by_side(tiny_folder,
                                                                                                  tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_folder), "--methods", "numerical,flap", "--ratios", "0.3",
                 "--calib-per-class", "2", "--eval-per-class", "4", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["dense", "numerical", "flap"]
    for row in results["rows"]:
        assert set(row["measures"]) == {"frechet_distance", "class_accuracy", "heldout_nll", "heldout_bits"}
        assert 0 <= row["measures"]["class_accuracy"] <= 1 and row["measures"]["heldout_nll"] > 0
    assert results["evaluation"]["per_class"] == 4
    assert "Fréchet distance" in (out / "results.md").read_text()
    with Image.open(out / "samples.png") as png:
        # three grids (10 classes x 4 samples, 8x8 pixels enlarged 4x, 2-pixel padding) side by side with
        # 8-pixel gaps, under 14-pixel captions
        assert png.size == (3 * (4 * 34 + 2) + 4 * 8, 10 * 34 + 2 + 14 + 2 * 8)
    assert (out / "measures.png").is_file()


def test_prune_on_an_image_generator_reports_dense_and_pruned_image_measures(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--calib-per-class", "2", "--eval", "digits",
                 "--eval-per-class", "3", "--cfg-scale", "1.5", "--out", str(out), "--quiet"]) == 0
    assert "image measures (3 per class vs held-out digits): Fréchet distance" in capsys.readouterr().out
    report = json.loads((out / "pruning_report.json").read_text())
    measures = report["image_measures"]
    assert measures["protocol"]["cfg_scale"] == 1.5 and measures["protocol"]["seed"] == 1
    assert measures["dense"]["heldout_nll"] != measures["pruned"]["heldout_nll"]
    assert main(["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--eval", "sotu", "--out",
                 str(tmp_path / "x")]) == 2  # text on an image generator: one line, before calibrating
    assert "measured with --eval digits" in capsys.readouterr().err


def test_bench_measures_images_per_second_of_dense_and_pruned_image_generators():
    from numprune import prune
    from numprune.bench import bench, format_table
    from numprune.image.calibration import self_generated_tokens

    dense = tiny_digits_generator()
    pruned, _ = prune(dense, self_generated_tokens(dense, 1, progress=False), ratio=0.4, progress=False)
    results = bench([("dense", dense), ("pruned", pruned)], batch_sizes=(2,), warmup=0, repeats=1, prompt_len=8)
    for run in results["runs"]:
        assert run["generation"]["tokens_per_s"] == pytest.approx(run["generation"]["images_per_s"] * 64)
    assert results["runs"][1]["vs_reference"]["weight_ratio"] < 1
    assert "images/s" in format_table(results).splitlines()[0]


# --- Inception metrics (ImageNet generators), through torch-fidelity --------------------------------------

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name


def test_inception_metrics_without_torch_fidelity_is_one_clear_error():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        from numprune.errors import NumpruneError
        from numprune.evaluate.image import inception_metrics

        with pytest.raises(NumpruneError, match=r"numprune\[imagenet\]"):
            inception_metrics(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    else:
        pytest.skip("torch-fidelity is installed")


def test_inception_metrics_through_torch_fidelity():
    pytest.importorskip("torch_fidelity")
    from pathlib import Path

    from numprune.evaluate.image import inception_metrics

    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not weights.is_file():
        pytest.skip(f"torch-fidelity's Inception weights are not at {weights}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 64, 64), generator=generator, dtype=torch.uint8)
    other = (images.float() * 0.5).to(torch.uint8)
    same = inception_metrics(images, images, cuda=False, weights_path=str(weights))
    assert abs(same["fid"]) < 1e-3 and same["precision"] == pytest.approx(1.0) and same["inception_score"] >= 1.0
    assert inception_metrics(images, other, cuda=False, weights_path=str(weights))["fid"] > same["fid"] + 1
