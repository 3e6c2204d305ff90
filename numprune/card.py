"""The model card (README.md with Hugging Face front matter) that every model folder numprune writes carries.

It says what the folder holds before anyone opens pruning_report.json: the model it came from
(``base_model``), the license and terms carried over from that model, how it was pruned (method,
ratio, the full recipe, numprune's version), what the run measured, and how to load it. The front
matter is what the hub and ``huggingface_hub.ModelCard`` read; the body is for people.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

from numprune.data.assets import source_card
from numprune.report import REPORT_NAME
from numprune.version import VERSION

CARD_NAME = "README.md"
TAGS = ["numprune", "pruned", "structured-pruning"]
# Front matter that travels from the source model's card to the pruned one: its license and terms.
CARRIED = re.compile(r"license(_name|_link)?$|extra_gated_\w+$")
HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?")  # name or owner/name, as the hub spells them
# A folder in the Hugging Face cache: .../models--owner--name/snapshots/<revision>
HUB_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def write_pruned_card(folder: Path, report: Mapping, source: str | None) -> Path:
    """Write the card of a pruned model into ``folder`` (the output writer's temporary folder).

    ``source`` is where the model was loaded from: a folder (its card's license and terms are carried
    over) or a hub id (it becomes ``base_model``); None when unknown.
    """
    origin = _origin(source)
    data = ModelCardData(library_name="transformers", tags=TAGS,
                         base_model=origin.get("base_model"),
                         **{k: v for k, v in origin.items() if CARRIED.match(k)})
    pruning = "parameters" in report and "options" in report  # save_pruned also takes a report of the caller's own
    body = "\n".join([_pruned_title(report, source, origin) if pruning else _saved_title(report, source, origin),
                      _how_pruned(report) if pruning else "", _measured(report), _how_to_load(report), _terms(origin)])
    return _save(folder, data, body)


def write_trained_card(folder: Path, report: Mapping, title: str, loads: str) -> Path:
    """Write the card of a model numprune trained itself (the digits generator): its recipe and figures."""
    data = ModelCardData(library_name="transformers", tags=["numprune", "image-generation", "llamagen"])
    body = "\n".join([f"# {title}\n", f"Trained by numprune {VERSION}. Its training record:\n",
                      "```json", json.dumps(report, indent=2), "```\n", "## How to load\n", loads])
    return _save(folder, data, body)


def recipe(options: Mapping) -> str:
    """The options as one ``method:key=value`` string, which ``PruneOptions.parse`` (and ``compare --methods``)
    read back into the same options."""
    flat = {**{k: v for k, v in options.items() if k not in ("ratio", "method", "score_options")},
            **options.get("score_options", {})}
    return ":".join([options["method"], *(f"{k}={_text(v)}" for k, v in flat.items() if v is not None)])


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _save(folder: Path, data: ModelCardData, body: str) -> Path:
    path = Path(folder) / CARD_NAME
    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    # A name that is not UTF-8 (a calibration file's, its undecodable bytes held as surrogates) shows "?" for them.
    ModelCard(text.encode("utf-8", "replace").decode("utf-8")).save(path)
    return path


def _origin(source: str | None) -> dict:
    """What the card says of the source model: ``base_model`` and the front matter it carries over.

    A package model numprune converted (SmolLM2, Gemma 3) is its hub model; a folder with a card keeps
    that card's license and terms, and a folder numprune wrote keeps its own ``base_model`` (pruning a
    pruned model still names the original); a hub id, or a folder in the hub's cache, is the base model.
    """
    if not source:
        return {}
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return {"base_model": source} if HUB_ID.fullmatch(source) else {}
    known = source_card(folder)
    if known is not None:
        return dict(known)
    metadata = _front_matter(folder / CARD_NAME)
    origin = {k: v for k, v in metadata.items() if CARRIED.match(k)}
    snapshot = HUB_SNAPSHOT.search(str(folder.resolve()))
    if snapshot:
        origin["base_model"] = f"{snapshot[1]}/{snapshot[2]}"
    elif "numprune" in (metadata.get("tags") or []) and metadata.get("base_model"):
        origin["base_model"] = metadata["base_model"]
    return origin


def _front_matter(card: Path) -> dict:
    """The source card's front matter; none when it is missing or unreadable (a card is never worth a failed save)."""
    try:
        metadata = metadata_load(card) if card.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not a mapping, or not UTF-8
        return {}
    return metadata or {}


def _source_name(report: Mapping, source: str | None, origin: dict) -> str:
    return origin.get("base_model") or report.get("model") or (Path(source).name if source else "The source model")


def _saved_title(report: Mapping, source: str | None, origin: dict) -> str:
    name = _source_name(report, source, origin)
    return (f"# {name}, saved by numprune\n\nA modified version of {name}, saved by numprune {VERSION}; the report "
            f"given with it (`{REPORT_NAME}`) records no pruning run.\n")


def _pruned_title(report: Mapping, source: str | None, origin: dict) -> str:
    name = _source_name(report, source, origin)
    p = report["parameters"]
    depth = report.get("depth")
    what = (f"{len(depth['removed_layers'])} whole decoder layers of {depth['layers_before']}"
            + (" and attention heads and MLP channels" if report["method"] != "depth" else "")
            if depth else "whole attention heads and MLP channels")
    return (f"# {name}, pruned by numprune\n\n{name}, with {p['achieved_ratio']:.1%} of its attention and MLP parameters "
            f"removed ({what}, target {p['target_ratio']:.0%}): "
            f"{p['total_before']:,} -> {p['total_after']:,} parameters. It is a modified version of the source model, "
            f"pruned by numprune {report.get('numprune_version', VERSION)}.\n")


def _auto_choice(report: Mapping) -> str:
    """What the auto allocation chose, from the report's record (nothing for the other allocations)."""
    record = report.get("auto_allocation")
    if not isinstance(record, Mapping) or "chosen_blend_weight" not in record:
        return ""
    return (f", which chose blend weight {record['chosen_blend_weight']} on held-out text (`{REPORT_NAME}` has each "
            "candidate)")


def _how_pruned(report: Mapping) -> str:
    options = report["options"]
    calibration = report.get("calibration", {})
    width = [f"| allocation | `{options['allocation']}`{_auto_choice(report)} |",
             f"| compensation | `{options['compensation']}` ({options['compensation_stats']} statistics) |"]
    lines = ["## How it was pruned\n", "| | |", "|---|---|",
             f"| source | {report.get('model') or 'not recorded'} |",
             f"| method | `{report['method']}` |",
             *(width if report["method"] != "depth" else []),  # removing layers only, nothing is allocated or refitted
             # the whole run's target (with depth: the layers' share, then the width step's ratio of the rest)
             f"| ratio | target {report['parameters']['target_ratio']:.4g}, achieved "
             f"{report['parameters']['achieved_ratio']:.4f} |"]
    if report.get("depth"):
        depth = report["depth"]
        patched = depth.get("patched_layers") or [depth["patched_layer"]]  # several with scattered
        lines.append(f"| layers removed | {depth['removed_layers']} ({depth['selection']}"
                     + (f"; least-squares patch folded into layer{'s' * (len(patched) > 1)} "
                        f"{', '.join(map(str, patched))}, ridge {depth['ridge']}"
                        if depth["patched_layer"] is not None else "") + ") |")
    if report.get("healing"):
        lines.append(f"| healing | {_healing(report['healing'])} |")
    if "source" in calibration:
        shape = (f"{calibration['nsamples']} x {calibration['seqlen']} tokens"
                 if {"nsamples", "seqlen"} <= calibration.keys() else f"{calibration.get('tokens')} tokens")
        lines.append(f"| calibration | {calibration['source']}, {shape}, seed {calibration.get('seed')} |")
    elif "tokens" in calibration:
        lines.append(f"| calibration | {calibration['tokens']} tokens given to `numprune.prune` |")
    lines += [f"| numprune | {report.get('numprune_version', VERSION)} |", ""]
    depth = report.get("depth")
    if depth:
        lines.append(f"Layers first: `numprune prune --depth {len(depth['removed_layers'])} --depth-selection "
                     f"{depth['selection']}" + (f" --depth-ridge {depth['ridge']}`" if depth["ridge"] is not None
                                                else "`") + (", then the width step below.\n"
                                                             if report["method"] != "depth" else ".\n"))
    if report["method"] != "depth":
        lines += ["The whole recipe, as `numprune.PruneOptions.parse` and `numprune compare --methods` read it "
                  f"(with `--ratio {options['ratio']}`):\n", f"```\n{recipe(options)}\n```\n"]
    lines.append(f"Per-layer widths, times and memory are in `{REPORT_NAME}`.\n")
    return "\n".join(lines)


def _healing(healing: Mapping) -> str:
    """What healing did after the surgery, in words (numprune.heal's record)."""
    parts = []
    if layers := healing.get("layers"):
        parts.append(f"block-local: each layer fitted to the dense layer's output ({sum(la['kept'] for la in layers)} "
                     f"of {len(layers)} kept the fit)")
    if distilled := healing.get("distillation"):
        parts.append(f"distillation from the dense model's next-token distribution, {distilled['tokens']:,} "
                     "calibration tokens")
    return ", then ".join(parts)


def _measured(report: Mapping) -> str:
    """The run's own dense-vs-pruned figures, whatever the evaluation (perplexity per text, image measures)."""
    rows, protocols = [], []
    for key in ("perplexity", "image_measures"):
        record = report.get(key)
        if not record:
            continue
        if "dense" in record:  # one protocol, several measures
            rows += [(key, name, record["dense"][name], record["pruned"][name]) for name in record["dense"]]
            protocols.append(record.get("protocol"))
        else:  # one record per text
            rows += [(key, name, r["dense"], r["pruned"]) for name, r in record.items()]
            protocols += [{name: r.get("protocol")} for name, r in record.items()]
    if not rows:
        return ("## What was measured\n\nNothing in this run. `numprune ppl --model <this folder> --data sotu,moby-dick` "
                "measures perplexity; `numprune eval` zero-shot accuracy.\n")
    table = ["## What was measured\n", "| measure | on | dense | pruned |", "|---|---|---|---|",
             *(f"| {key} | {name} | {dense:.4g} | {pruned:.4g} |" for key, name, dense, pruned in rows)]
    return "\n".join([*table, "", "Protocol:\n", "```json", json.dumps(protocols, indent=2), "```\n"])


def _how_to_load(report: Mapping) -> str:
    stock = report.get("loads_without_numprune")
    if stock is None:
        first = ["import numprune  # needed only for numprune's own configs (model_type numprune_*)"]
        note = ("A stock config (see `model_type` in `config.json`) loads in plain transformers; numprune's own "
                "configs (`numprune_*`) load after `import numprune` (no `trust_remote_code`).")
    elif stock:
        first = []
        note = "Its config is the family's stock one: plain transformers loads it, numprune is not needed."
    else:
        first = ["import numprune  # registers numprune's model classes with transformers' Auto classes"]
        note = (f"Its config is numprune's (`{report.get('config_class')}`): per-layer widths, or a head count or output "
                "bias the stock config cannot say. Load it after `import numprune` (no `trust_remote_code`).")
    python = [*first, "from transformers import AutoModelForCausalLM", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")']
    return "\n".join(["## How to load\n", note, "", "```python", *python, "```", "",
                      "For llama.cpp and Ollama (LLaMA and Mistral layouts): `numprune export --model path/to/this/folder "
                      "--gguf model.gguf`, then `llama-cli -m model.gguf` (or `FROM ./model.gguf` in an Ollama "
                      "Modelfile).\n"])


def _terms(origin: dict) -> str:
    license_ = origin.get("license")
    if not license_:
        return ("## License and terms\n\nThe source model's license was not found in its folder; "
                "the source model's own license and terms apply.\n")
    link = origin.get("license_link")
    lines = ["## License and terms\n", f"Carried over from the source model: `{license_}`"
             + (f" ({link})." if link else ".")]
    if origin.get("notice"):
        lines += ["", origin["notice"]]
    return "\n".join(lines) + "\n"
