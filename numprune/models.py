"""Resolve a model spec (the embedded model, a local folder or a hub id) to a model and its tokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import huggingface_hub.constants
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from numprune.data.assets import GEMMA3_PACKAGE, SMOLLM2_PACKAGE, gemma3_270m_folder, smollm2_folder
from numprune.errors import NumpruneError
from numprune.io.inputs import check_safetensors

EMBEDDED_MODEL = "smollm2"
DIGITS_MODEL = "digits"  # a small LlamaGen trained on scikit-learn's digits (numprune.image.digits)
# Models that reach this machine as PyPI packages: spec -> (cached folder, name, role, package).
REGISTRY_MODELS = {
    EMBEDDED_MODEL: (smollm2_folder, "SmolLM2-135M-Instruct", "embedded", SMOLLM2_PACKAGE),
    "gemma3-270m": (gemma3_270m_folder, "Gemma 3 270M", "optional", GEMMA3_PACKAGE),
}
# Files whose presence means a folder ships a tokenizer (fast, sentencepiece or BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_TIMEOUT_S = 5  # one connection attempt to the Hugging Face hub before a hub id is looked up
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Config counts a model is built from (GPT-2's and OPT's own names map onto these).
COUNT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
                "vocab_size", "max_position_embeddings", "head_dim", "ffn_dim", "layer_num_attention_heads",
                "layer_num_key_value_heads", "layer_intermediate_sizes", "n_layer", "n_head", "n_embd", "n_positions")


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer, description)`` for ``spec``, the model in eval mode.

    ``None`` or ``"smollm2"`` is the embedded SmolLM2-135M-Instruct (works offline), ``"gemma3-270m"``
    Gemma 3 270M when its optional package is installed, ``"digits"`` the embedded digits image
    generator (trained and cached on first use; tokenizer None); an existing folder is loaded as saved (its
    tokenizer is None if it has none, as a pruned model saved without one); anything else is a hub
    id. The description says where the model came from, for reports.
    """
    if spec is None or spec in REGISTRY_MODELS:
        _, name, role, package = REGISTRY_MODELS[spec or EMBEDDED_MODEL]
        folder = registry_folder(spec)
        description = f"{name} ({role}, {package} {importlib.metadata.version(package)})"
        return *_load(str(folder), dtype, with_tokenizer=True), description
    if spec == DIGITS_MODEL:  # the embedded image generator: no tokenizer (its tokens are grey levels)
        from numprune.image.digits import DIGITS_DESCRIPTION, digits_model_folder

        return *_load(str(digits_model_folder()), dtype, with_tokenizer=False), DIGITS_DESCRIPTION
    folder = Path(spec).expanduser()
    if folder.is_dir():  # by its absolute path: the folder its outputs protect, whatever the working folder later
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        return *_load(str(folder.absolute()), dtype, with_tokenizer=has_tokenizer), str(folder.resolve())
    if _looks_like_path(spec):
        raise NumpruneError(f"no model folder at {spec}")
    _check_hub_reachable(spec)
    return *_load(spec, dtype, with_tokenizer=True), spec


def model_folder(spec: str | None) -> Path | None:
    """The local folder ``spec`` names (a registry model's cache, the digits model's, an existing folder, a hub
    model's folder in the Hugging Face cache); None for a hub id not cached. Outputs are checked against it, so
    that none is ever written into or over it (a cached snapshot's file replaced breaks every later load)."""
    if spec is None or spec in REGISTRY_MODELS:
        return registry_folder(spec)
    if spec == DIGITS_MODEL:
        from numprune.image.digits import default_digits_folder

        return default_digits_folder()
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder
    if _looks_like_path(spec):  # a missing folder, not a hub id: the loader says so in one line
        return None
    try:
        cached = Path(huggingface_hub.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=spec, repo_type="model")
    except HFValidationError:  # not a valid hub id either: nothing to protect
        return None
    return cached if cached.is_dir() else None


def source_folder(loaded) -> str | None:
    """The folder a model or a tokenizer was loaded from, if it was one (what its outputs must never replace):
    transformers records it as ``config._name_or_path`` (a model) or ``name_or_path`` (a tokenizer)."""
    name = getattr(getattr(loaded, "config", None), "_name_or_path", "") or getattr(loaded, "name_or_path", "") or ""
    return name if isinstance(name, str) and os.path.isdir(name) else None


def registry_folder(spec: str | None) -> Path | None:
    """The cached folder of a model that comes as a PyPI package (``None`` = the embedded one); None for other specs."""
    if spec is None or spec in REGISTRY_MODELS:
        return REGISTRY_MODELS[spec or EMBEDDED_MODEL][0]()  # a clear error first when the package is missing
    return None


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``. A leading ``.``, ``~`` or ``/``, a second ``/``, a ``\\``
    or an ``owner`` that is a local folder (``runs/pruned``) means a path: better a clear "no folder"
    than a hub lookup that retries for 20 s before failing."""
    return (spec.startswith((".", "~", "/")) or spec.count("/") > 1 or "\\" in spec
            or ("/" in spec and Path(spec).parent.is_dir()))


def _check_hub_reachable(spec: str) -> None:
    """Before a hub id is looked up: one line saying what to do when the hub cannot be reached and the model is not
    cached (or HF_HUB_OFFLINE is set and it is not cached), instead of half a minute of retries and a bare
    network error. One connection attempt, to the hub or the proxy that reaches it, of at most HUB_TIMEOUT_S."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    choices = f"give a local model folder or '{EMBEDDED_MODEL}'"
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise NumpruneError(f"model '{spec}' is not a local folder, and HF_HUB_OFFLINE is set but the Hugging Face "
                                f"cache does not hold it: {choices}, or download it once while online")
        return
    endpoint = urlsplit(constants.ENDPOINT)
    proxy = urlsplit(getproxies().get(endpoint.scheme, "")) if not proxy_bypass(endpoint.hostname or "") else None
    address = proxy if proxy and proxy.hostname else endpoint
    try:
        socket.create_connection((address.hostname, address.port or (443 if address.scheme == "https" else 80)),
                                 timeout=HUB_TIMEOUT_S).close()
    except (OSError, ValueError, TypeError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        then = ("set HF_HUB_OFFLINE=1 to use the cached copy" if cached else
                f"{choices}, or set HF_HUB_OFFLINE=1 with the model in the Hugging Face cache")
        raise NumpruneError(f"model '{spec}' is not a local folder and the Hugging Face hub ({address.hostname}) "
                            f"cannot be reached ({reason}): {then}") from None


def _load(source: str, dtype: torch.dtype, with_tokenizer: bool):
    """The model (safetensors only, no code from the folder, every tensor checked) and its tokenizer."""
    if Path(source).is_dir():
        check_model_folder(Path(source))
    config = load_config(source)
    try:
        with _quiet_transformers():
            # Mismatched shapes are reported in ``info`` (and refused below by name) rather than raised.
            model, info = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                               trust_remote_code=False, use_safetensors=True,
                                                               ignore_mismatched_sizes=True, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False) if with_tokenizer else None
    except Exception as e:  # noqa: BLE001  (a hostile folder makes transformers raise almost any type)
        raise NumpruneError(f"could not load model '{source}': {_reason(e)}") from None
    check_weights_fit(source, *(info.get(f"{kind}_keys") or () for kind in ("missing", "unexpected", "mismatched")))
    check_finite(model.state_dict(), source)
    return model.eval(), tokenizer


def load_config(source: str | os.PathLike):
    """The config of ``source`` (a folder or a hub id) as transformers reads it, checked; one line with the
    reason when transformers refuses it (heads that do not divide the hidden size, ...)."""
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (a hostile config makes transformers raise almost any type)
        raise NumpruneError(f"could not load model '{source}': {_reason(e)}") from None
    check_config(config, source)
    return config


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause: transformers wraps the reason (a config validator's ValueError)
    in an error whose own first line does not say it."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_weights_fit(source, missing=(), unexpected=(), mismatched=()) -> None:
    """Refuse weights that do not fit the config, naming the first tensor: ``missing`` and ``unexpected`` are
    names, ``mismatched`` (name, shape in the file, shape the config gives) triples."""
    shapes = {str(name): f" (shape {list(found)} in the file, {list(expected)} from the config)"
              for name, found, expected in mismatched}
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("mismatched", shapes)):
        names = sorted(map(str, names))
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise NumpruneError(f"the weights of '{source}' do not fit its config: {kind} tensor {names[0]}"
                                f"{shapes.get(names[0], '')}{more}")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report and progress bar off while loading: numprune's own check says what is wrong,
    in one line."""
    verbosity, bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()


def check_model_folder(folder: Path) -> None:
    """Refuse, before transformers reads it, a folder that would need its own code run, a pickle opened,
    or that has no readable safetensors weights."""
    for name in ("config.json", "tokenizer_config.json"):
        if name == "config.json" and not (folder / name).is_file():
            raise NumpruneError(f"{folder} has no config.json, so it is not a model folder")
        if (folder / name).is_file() and "auto_map" in _read_json(folder / name):
            raise NumpruneError(f"{folder / name} names Python code of its own (auto_map); numprune never runs "
                                "a model folder's code")
    check_config(_read_json(folder / "config.json"), folder)
    files = safetensors_files(folder)
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise NumpruneError(f"{folder} has only pickled weights ({pickles[0]}); numprune reads safetensors only. "
                                f"Convert them: load with torch.load(path, weights_only=True) and save with "
                                "safetensors.torch.save_file, or save_pretrained(folder, safe_serialization=True)")
        raise NumpruneError(f"{folder} has no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX})")
    for path in files:
        check_safetensors(path)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those its index names, else ``model.safetensors``; [] if neither."""
    if (folder / WEIGHTS_INDEX).is_file():
        weight_map = _read_json(folder / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise NumpruneError(f"{folder / WEIGHTS_INDEX} is not a safetensors index (no weight_map)")
        names = sorted(set(map(str, weight_map.values())))
        outside = [n for n in names if Path(n).name != n]
        if outside:
            raise NumpruneError(f"{folder / WEIGHTS_INDEX} names a file outside the folder: {outside[0]}")
        return [folder / n for n in names]
    return [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else []


def check_config(config, source) -> None:
    """Counts a model is built from must be positive integers (a config with -1 layers builds an empty model).
    ``config`` is a config object or config.json's raw dict (checked before transformers parses it)."""
    def field(name):
        return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

    for name in COUNT_FIELDS:
        values = field(name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise NumpruneError(f"the config of '{source}' has {name} = {values!r}; it must be a positive integer")
    heads, kv = field("num_attention_heads"), field("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise NumpruneError(f"the config of '{source}' has {heads} attention heads over {kv} KV heads, "
                            "which do not divide them")


def check_finite(state: dict[str, torch.Tensor], source) -> None:
    """Weights with NaN or infinity give meaningless statistics; refuse them by name."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            raise NumpruneError(f"the weights of '{source}' hold NaN or infinite values (tensor {name})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NumpruneError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise NumpruneError(f"{path} does not hold a JSON object")
    return data
