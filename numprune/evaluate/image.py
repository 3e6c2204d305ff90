"""Image measures for class-conditional token generators: what perplexity is to a language model.

For the digits model (8x8 digits as 64 tokens) numprune carries its own yardstick:
- a small CNN trained on the digits *train* split only (deterministic, seconds, cached as
  safetensors), whose penultimate layer is the feature space, as Inception's pool layer is FID's;
- the Fréchet distance between generated and held-out real images in that space (FID's recipe);
- class accuracy: the share of generated images the classifier assigns to the requested class;
- held-out likelihood: per-token NLL (and bits) of the held-out real images under the model,
  teacher-forced with their true label; it needs no sampling, so it is the least noisy of the three.
For ImageNet generators (LlamaGen) ``inception_metrics`` gives FID, IS, precision and recall
through torch-fidelity (``pip install numprune[imagenet]``); the paper's sFID needs the ADM
suite's spatial Inception features, which torch-fidelity does not offer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from numprune.data.assets import build_atomically, cache_dir
from numprune.errors import NumpruneError
from numprune.evaluate.base import Column, Evaluation, Measurement
from numprune.evaluate.perplexity import summed_nll
from numprune.image.calibration import CALIB_CFG_SCALE
from numprune.image.digits import digits_split, one_thread, tokens_to_images
from numprune.image.grid import by_class, grid_image, save_png, side_by_side
from numprune.image.sampling import generate
from numprune.modeling.llamagen import LlamaGenConfig

CLASSIFIER_VERSION = 1  # part of the cache folder's name: bump when the architecture or training changes
FEATURES = 32
DIGIT_CLASSES = 10
GRID_COLUMNS = 8  # samples per class shown in samples.png


def is_image_generator(model) -> bool:
    """Whether ``model`` is a class-conditional image generator (LlamaGen layout): image measures, not perplexity."""
    return getattr(model.config, "model_type", None) == LlamaGenConfig.model_type


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 pool and a 32-wide hidden layer (the feature space) on 8x8 images in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, DIGIT_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float()[:, None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, epochs: int = 30,
                     batch_size: int = 64, lr: float = 3e-3) -> DigitsClassifier:
    """Adam on ``images`` ``[N, 8, 8]``, one thread; initialisation and batch order come from ``seed`` alone."""
    with torch.random.fork_rng(), one_thread():  # leaves the caller's global random state as it was
        torch.manual_seed(seed)
        model = DigitsClassifier()
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for batch in torch.randperm(len(images), generator=order).split(batch_size):
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def digits_classifier() -> DigitsClassifier:
    """The classifier trained on the digits train split, from the cache or trained (a few seconds) and cached.

    The cache folder's name carries a hash of the training split, so a different split never
    reuses a classifier that saw other images.
    """
    split = digits_split()
    tokens, labels = split["train_tokens"], split["train_labels"]
    digest = hashlib.sha256(tokens.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:12]

    def build(folder: Path) -> None:
        model = train_classifier(tokens_to_images(tokens), labels)
        save_file(model.state_dict(), folder / "model.safetensors")
        heldout = class_accuracy(model, tokens_to_images(split["heldout_tokens"]), split["heldout_labels"])
        (folder / "info.json").write_text(json.dumps({"version": CLASSIFIER_VERSION, "train_images": len(tokens),
                                                      "heldout_accuracy": heldout}, indent=2) + "\n")

    folder = build_atomically(cache_dir() / f"digits-classifier-v{CLASSIFIER_VERSION}-{digest}", build)
    model = DigitsClassifier()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


@torch.inference_mode()
def features(classifier: DigitsClassifier, images: torch.Tensor) -> np.ndarray:
    """Penultimate-layer features of ``images``, float64 ``[N, FEATURES]``."""
    return classifier.features(images).double().numpy()


@torch.inference_mode()
def class_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` that ``classifier`` assigns to their requested class ``labels``."""
    return (classifier(images).argmax(-1) == labels).double().mean().item()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (means, unbiased covariances), as FID."""
    for name, f in (("first", features_a), ("second", features_b)):
        if f.ndim != 2 or len(f) < 2:
            raise NumpruneError(f"the Fréchet distance needs at least two feature vectors per set; the {name} "
                                f"set has shape {f.shape}")
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """``|mu_a - mu_b|^2 + tr(cov_a + cov_b - 2 (cov_a^1/2 cov_b cov_a^1/2)^1/2)``.

    The trace term is computed by symmetric eigen-decompositions rather than ``sqrtm(cov_a @ cov_b)``:
    ``cov_a^1/2 cov_b cov_a^1/2`` has the same eigenvalues as ``cov_a cov_b`` but is symmetric, so its
    eigenvalues are real, and the tiny negative ones that rank-deficient covariances (fewer samples
    than features) produce are clipped to zero instead of turning into complex square roots.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def heldout_nll(model, tokens: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 128,
                progress: bool = False) -> dict:
    """Mean NLL per image token (nats and bits) of real images ``tokens`` ``[N, T]`` given their ``labels``.

    Teacher forcing: the model reads ``[label, t_1 .. t_T]`` and the logits at each position
    score the next token, so every one of the ``T`` image tokens is scored, the first given the
    label alone (the same loop as perplexity's).
    """
    if tokens.dim() != 2 or len(tokens) != len(labels) or len(tokens) == 0:
        raise NumpruneError(f"held-out NLL needs tokens [N, T] and N labels, got {tuple(tokens.shape)} "
                            f"and {tuple(labels.shape)}")
    ids = torch.cat([labels[:, None].to(tokens.device), tokens], dim=1)
    total = summed_nll(model, ids, batch_size, progress, desc="held-out NLL")
    mean = total / tokens.numel()
    return {"nll": mean, "bits": mean / math.log(2), "tokens": tokens.numel(), "images": len(tokens)}


@dataclass
class DigitsProtocol:
    """What an image measurement depends on: recorded with every result."""

    per_class: int = 50
    classes: list[int] = field(default_factory=lambda: list(range(DIGIT_CLASSES)))
    cfg_scale: float = CALIB_CFG_SCALE
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def sampling(self) -> dict:
        return dict(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    seed=self.seed)


class DigitsEvaluator(Evaluation):
    """Measures a digits generator against the held-out real digits; built once, applied to many models.

    The classifier and the held-out features are computed once. Each measurement generates
    ``per_class`` images of every class with the same seed and sampling options, so dense and
    pruned models are compared on the same random draws; the images are its artefact, drawn side by
    side for every model in samples.png.
    """

    row_key = "measures"
    report_key = "image_measures"
    plot_name = "measures.png"
    artefact_names = ("samples.png",)

    def __init__(self, protocol: DigitsProtocol | None = None, progress: bool = False):
        self.protocol = protocol or DigitsProtocol()
        if self.protocol.per_class < 2 or not self.protocol.classes:
            raise NumpruneError(f"image measures need at least 2 samples per class and one class, got "
                                f"{self.protocol.per_class} and {self.protocol.classes}")
        if not set(self.protocol.classes) <= set(range(DIGIT_CLASSES)):
            raise NumpruneError(f"digit classes are 0-9, got {self.protocol.classes}")
        self.progress = progress
        split = digits_split()
        self.heldout_tokens, self.heldout_labels = split["heldout_tokens"], split["heldout_labels"]
        self.classifier = digits_classifier()
        self.reference = features(self.classifier, tokens_to_images(self.heldout_tokens))

    def describe(self) -> dict:
        return {**asdict(self.protocol), "reference": f"held-out real digits ({len(self.heldout_tokens)} images)",
                "feature_space": f"penultimate layer ({FEATURES} features) of numprune's digits classifier "
                                 f"v{CLASSIFIER_VERSION}, trained on the train split only"}

    def columns(self) -> list[Column]:
        return [Column("frechet_distance", "Fréchet distance", ".3f"), Column("class_accuracy", "class accuracy", ".1%"),
                Column("heldout_nll", "held-out NLL", ".3f")]

    def measure(self, model) -> Measurement:
        """The measures of ``model``; the artefact is ``(images [N, 8, 8], labels [N])``, the generated digits."""
        p = self.protocol
        labels = torch.tensor(p.classes).repeat_interleave(p.per_class)
        images = tokens_to_images(generate(model, labels, batch_size=64, progress=self.progress, **p.sampling()))
        nll = heldout_nll(model, self.heldout_tokens, self.heldout_labels, progress=self.progress)
        measures = {"frechet_distance": frechet_distance(features(self.classifier, images), self.reference),
                    "class_accuracy": class_accuracy(self.classifier, images, labels),
                    "heldout_nll": nll["nll"], "heldout_bits": nll["bits"]}
        return Measurement(measures, (images, labels))

    def summary(self, dense: dict[str, float], pruned: dict[str, float]) -> list[str]:
        return [f"image measures ({self.protocol.per_class} per class vs held-out digits): Fréchet distance "
                f"{dense['frechet_distance']:.2f} -> {pruned['frechet_distance']:.2f}, class accuracy "
                f"{dense['class_accuracy']:.1%} -> {pruned['class_accuracy']:.1%}, held-out NLL "
                f"{dense['heldout_nll']:.4f} -> {pruned['heldout_nll']:.4f} nats/token"]

    def write_artefacts(self, artefacts: dict[str, tuple[torch.Tensor, torch.Tensor]], folder: Path) -> None:
        save_png(samples_picture(artefacts, self.protocol.classes), folder / "samples.png")


def samples_picture(samples: dict, classes: list[int]):
    """Every model's samples as a grid (rows: classes), the grids side by side, captioned with the model."""
    per_row = min(GRID_COLUMNS, min(int((labels == c).sum()) for _, labels in samples.values() for c in classes))
    return side_by_side({name: grid_image(by_class(images, labels, classes, per_row))
                         for name, (images, labels) in samples.items()})


def inception_metrics(generated, reference, *, cuda: bool | None = None, batch_size: int = 64,
                      weights_path: str | None = None, precision_recall: bool = True) -> dict:
    """FID, Inception score, precision and recall through torch-fidelity (the ImageNet yardstick).

    ``generated`` and ``reference`` are uint8 tensors ``[N, 3, H, W]`` or folders of image files.
    Every measure uses Inception-v3 (precision and recall too, on its 2048 pool features, as in the
    ADM suite the paper used; torch-fidelity's own default for them is VGG-16). torch-fidelity
    fetches the Inception weights on first use unless ``weights_path`` points to them (it reads
    that file with ``torch.load(weights_only=False)``: only pass a file you trust). sFID is not
    offered by torch-fidelity and is not reported.
    """
    try:
        import torch_fidelity
    except ImportError:
        raise NumpruneError("Inception metrics need torch-fidelity (and torchvision): pip install "
                            "'numprune[imagenet]'") from None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    metrics = torch_fidelity.calculate_metrics(
        input1=_as_fidelity_input(generated), input2=_as_fidelity_input(reference), cuda=cuda, batch_size=batch_size,
        fid=True, isc=True, prc=precision_recall, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights_path, cache=False, verbose=False)
    names = {torch_fidelity.KEY_METRIC_FID: "fid", torch_fidelity.KEY_METRIC_ISC_MEAN: "inception_score",
             torch_fidelity.KEY_METRIC_ISC_STD: "inception_score_std"}
    if precision_recall:
        names |= {torch_fidelity.KEY_METRIC_PRECISION: "precision", torch_fidelity.KEY_METRIC_RECALL: "recall"}
    return {ours: float(metrics[theirs]) for theirs, ours in names.items()}


class _UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity reads a dataset of uint8 ``[3, H, W]`` tensors."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise NumpruneError(f"Inception metrics need uint8 images [N, 3, H, W], got {images.dtype} "
                                f"{tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _as_fidelity_input(source):
    if isinstance(source, torch.Tensor):
        return _UInt8Images(source)
    if not Path(source).is_dir():
        raise NumpruneError(f"no image folder at {source}")
    return str(source)
