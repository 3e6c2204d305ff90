"""Image measures against direct computations: Fréchet distance, the digits classifier, class accuracy,
held-out NLL, the PNG grid, and the generate / compare commands on a tiny image generator."""

import json
import math
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import FakeClock
from PIL import Image
from torch import nn

import numprune.bench
from numprune import prune
from numprune.bench import bench, format_table
from numprune.cli import main
from numprune.evaluate.image import (
    DigitsEvaluator,
    DigitsProtocol,
    class_accuracy,
    digits_classifier,
    frechet_distance,
    frechet_distance_from_stats,
    heldout_nll,
    train_classifier,
)
from numprune.image.calibration import self_generated_tokens
from numprune.image.digits import digits_split, tokens_to_images
from numprune.image.grid import grid_image, parse_classes, save_png
from numprune.image.sampling import generate
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM
from numprune.models import load_model


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


def rendered_grid(images: torch.Tensor, scale: int, pad: int) -> np.ndarray:
    """What a grid of grey ``images`` [rows, cols, H, W] must look like, pixel by pixel: the pixel at (y, x) is
    background (255) unless it falls inside cell (row, col), where it shows that image's pixel (y', x') // scale."""
    rows, cols, height, width = images.shape
    cell_h, cell_w = height * scale + pad, width * scale + pad
    grey = (images.numpy().astype(np.float32).clip(0, 1) * np.float32(255)).round().astype(np.uint8)
    y, x = np.indices((rows * cell_h + pad, cols * cell_w + pad))
    row, dy = np.divmod(y - pad, cell_h)
    col, dx = np.divmod(x - pad, cell_w)
    inside = (y >= pad) & (x >= pad) & (dy < height * scale) & (dx < width * scale) & (row < rows) & (col < cols)
    picked = grey[row.clip(0, rows - 1), col.clip(0, cols - 1), (dy // scale).clip(0, height - 1),
                  (dx // scale).clip(0, width - 1)]
    return np.repeat(np.where(inside, picked, 255).astype(np.uint8)[..., None], 3, axis=2)


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def evaluator_of(protocol: dict) -> DigitsEvaluator:
    """The evaluator that a recorded protocol (``DigitsEvaluator.describe()``) describes."""
    return DigitsEvaluator(DigitsProtocol(**{f.name: protocol[f.name] for f in fields(DigitsProtocol)}))


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


class ReadsTheLabel(nn.Module):
    """A perfect classifier for images that carry their label in their first pixel (label / 9)."""

    def forward(self, images):
        return nn.functional.one_hot((images[:, 0, 0] * 9).round().long(), 10).float()


class AlwaysSays(nn.Module):
    """A constant classifier: every image is class ``c``."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c

    def forward(self, images):
        return nn.functional.one_hot(torch.full((len(images),), self.c), 10).float()


def test_class_accuracy_of_a_perfect_and_of_a_constant_classifier():
    labels = torch.tensor([0] * 3 + [1] * 7 + [2] * 20)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    images = torch.rand(30, 8, 8, generator=torch.Generator().manual_seed(1))
    images[:, 0, 0] = labels / 9
    assert class_accuracy(ReadsTheLabel(), images, labels) == 1.0
    assert class_accuracy(ReadsTheLabel(), images, (labels + 1) % 10) == 0.0
    for c, count in ((0, 3), (1, 7), (2, 20), (5, 0)):  # a constant answer is right for its class's share
        assert class_accuracy(AlwaysSays(c), images, labels) == pytest.approx(count / 30, rel=1e-15)


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

@pytest.mark.parametrize("scale,pad", [(4, 2), (1, 0), (3, 5)])
def test_grid_png_decodes_to_exactly_the_pixels_of_the_images_put_in(tmp_path, scale, pad):
    images = torch.rand(3, 5, 8, 7, generator=torch.Generator().manual_seed(scale))
    images[0, 0, 0, 0], images[2, 4, 7, 6] = -0.5, 1.5  # clamped to black and white
    path = save_png(grid_image(images, scale=scale, pad=pad), tmp_path / "grid.png")
    pixels = png_pixels(path)
    assert pixels.shape == (3 * (8 * scale + pad) + pad, 5 * (7 * scale + pad) + pad, 3)
    assert np.array_equal(pixels, rendered_grid(images, scale, pad))
    colour = torch.rand(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(9))  # [rows, cols, RGB, H, W]
    pixels = png_pixels(save_png(grid_image(colour, scale=2, pad=1), tmp_path / "colour.png"))
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], rendered_grid(colour[:, :, channel], 2, 1)[..., 0])


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
    # rows: the classes in order, columns: their samples, drawn with the same seed and guidance
    labels = torch.tensor([0, 1, 2, 5]).repeat_interleave(3)
    tokens = generate(load_model(str(tiny_folder))[0], labels, seed=1, cfg_scale=2.0, progress=False)
    assert np.array_equal(png_pixels(out), rendered_grid(tokens_to_images(tokens).reshape(4, 3, 8, 8), 2, 2))
    assert main(["generate", "--model", str(tiny_folder), "--classes", "0-10", "--grid", str(out)]) == 2


def test_compare_on_an_image_generator_reports_image_measures_and_writes_the_samples_side_by_side(
        tiny_folder, tmp_path, saved_figures):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_folder), "--methods", "numerical,flap", "--ratios", "0.3",
                 "--calib-per-class", "2", "--eval-per-class", "4", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["dense", "numerical", "flap"]
    assert results["evaluation"]["per_class"] == 4
    # the dense row is what the evaluator it records measures on the dense model
    evaluator = evaluator_of(results["evaluation"])
    dense = evaluator.measure(load_model(str(tiny_folder))[0])
    dense_measures, (dense_images, _) = dense.figures, dense.artefact
    assert rows[0]["measures"] == pytest.approx(dense_measures, rel=1e-12)
    for row in rows[1:]:
        assert set(row["measures"]) == set(dense_measures) and row["measures"] != dense_measures
    assert (out / "results.md").read_text() == "\n".join(
        ["| method | ratio | achieved | Fréchet distance | class accuracy | held-out NLL |", "|---|---|---|---|---|---|",
         *(f"| {r['method']} | {100 * r['ratio']:.0f}% | {100 * r['achieved_ratio']:.1f}% | "
           f"{r['measures']['frechet_distance']:.3f} | {100 * r['measures']['class_accuracy']:.1f}% | "
           f"{r['measures']['heldout_nll']:.3f} |" for r in rows)]) + "\n"
    # measures.png: one panel per measure, each method's value at its achieved ratio, dense as a level line
    (figure, _), = saved_figures
    assert [ax.get_title() for ax in figure.axes] == ["Fréchet distance", "class accuracy", "held-out NLL"]
    for ax, name in zip(figure.axes, ("frechet_distance", "class_accuracy", "heldout_nll")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for row in rows[1:]:
            assert list(lines[row["method"]].get_xydata()[0]) == [row["achieved_ratio"], row["measures"][name]]
        assert set(lines["dense"].get_ydata()) == {rows[0]["measures"][name]}
    # samples.png: three grids (10 classes x 4 samples, 8x8 pixels enlarged 4x, 2-pixel padding) side by side
    # with 8-pixel gaps, under 14-pixel captions; the first is exactly the dense model's samples
    pixels = png_pixels(out / "samples.png")
    assert pixels.shape == (10 * 34 + 2 + 14 + 2 * 8, 3 * (4 * 34 + 2) + 4 * 8, 3)
    dense_panel = pixels[8 + 14:8 + 14 + 10 * 34 + 2, 8:8 + 4 * 34 + 2]
    assert np.array_equal(dense_panel, rendered_grid(dense_images.reshape(10, 4, 8, 8), 4, 2))


def test_prune_on_an_image_generator_reports_dense_and_pruned_image_measures(tiny_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--calib-per-class", "2", "--eval", "digits",
                 "--eval-per-class", "3", "--cfg-scale", "1.5", "--out", str(out), "--quiet"]) == 0
    assert "image measures (3 per class vs held-out digits): Fréchet distance" in capsys.readouterr().out
    report = json.loads((out / "pruning_report.json").read_text())
    measures = report["image_measures"]
    assert measures["protocol"]["cfg_scale"] == 1.5 and measures["protocol"]["seed"] == 1
    # each is what the recorded protocol measures on the model it names: the input, and the saved output
    evaluator = evaluator_of(measures["protocol"])
    assert measures["dense"] == pytest.approx(evaluator.measure(load_model(str(tiny_folder))[0]).figures, rel=1e-12)
    assert measures["pruned"] == pytest.approx(evaluator.measure(load_model(str(out))[0]).figures, rel=1e-12)
    assert measures["dense"]["heldout_nll"] != measures["pruned"]["heldout_nll"]
    assert main(["prune", "--model", str(tiny_folder), "--ratio", "0.3", "--eval", "sotu", "--out",
                 str(tmp_path / "x")]) == 2  # text on an image generator: one line, before calibrating
    assert "measured with --eval digits" in capsys.readouterr().err


def test_bench_measures_images_per_second_of_dense_and_pruned_image_generators(monkeypatch):
    dense = tiny_digits_generator()
    pruned, report = prune(dense, self_generated_tokens(dense, 1, progress=False), ratio=0.4, progress=False)
    clock = FakeClock(1, 0.5, 1, 0.25, 1, 2)  # per run: start, done; the first run of each model is the warm-up
    monkeypatch.setattr(numprune.bench, "time", SimpleNamespace(perf_counter=clock))
    results = bench([("dense", dense), ("pruned", pruned)], batch_sizes=(2,), ratios=[0.0, 0.4], warmup=1, repeats=2,
                    prompt_len=8)
    assert len(clock.readings) == 2 * 2 * 3
    for run in results["runs"]:
        rates = [2 / 0.25, 2 / 2]  # 2 images in each timed run's seconds
        assert run["generation"] == {"images_per_s": (rates[0] + rates[1]) / 2, "images_per_s_min": min(rates),
                                     "images_per_s_max": max(rates), "tokens_per_s": (rates[0] + rates[1]) / 2 * 64}
        assert "prompt_len" not in run["protocol"] and run["protocol"]["image_tokens"] == 64
    assert results["runs"][1]["vs_reference"] == {
        "images_speedup": 1.0, "weight_ratio": results["runs"][1]["weight_bytes"] / results["runs"][0]["weight_bytes"],
        "peak_ratio": results["runs"][1]["model_peak_bytes"] / results["runs"][0]["model_peak_bytes"]}
    assert results["runs"][1]["weight_bytes"] == 4 * sum(p.numel() for p in pruned.parameters())
    table = format_table(results).splitlines()
    assert table[0].startswith("| model | ratio | params | batch | images/s (median [min-max]) | image tokens/s |")
    assert table[3].startswith(f"| pruned | 40.0% | {sum(p.numel() for p in pruned.parameters()) / 1e6:.2f}M | 2 | "
                               "4.50 [1.00-8.00] | 288.0 | ")


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
