"""Pruning a model larger than memory: weights read from disk one decoder layer at a time.

The model is built as a skeleton on the meta device from its config (buffers such as rotary
frequencies are real; they are tiny). ``StreamedModel`` is a layer source (numprune.sources) for the
run in numprune.pipeline, which ``prune_streaming`` drives as ``numprune.prune`` does. It
materialises, from the memory-mapped safetensors files, the modules before the first layer while
the first layer's inputs are captured, then layer i for its statistics and scores, and after the
global allocation layer i again for compensation; each layer, narrowed with its fits, is
written to its own output shard at once, and every layer is freed (back to meta) after its visit.
Tensors outside the decoder layers (embeddings, final norm, LM head) are copied as they are.
Weights keep the checkpoint's dtype; ``dtype`` only sets the precision of the layer passes.

Block-local healing streams the same way (``heal_streaming``, and ``prune_streaming`` with ``heal``): two
layer sources, the dense folder and the pruned one, each layer of each read only while numprune.heal's loop
visits it, each healed layer written to its own output shard at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from numprune import distributed
from numprune.adapters import LayerPlan, adapter_for
from numprune.adapters.base import projection_weight
from numprune.allocate import AUTO
from numprune.card import write_pruned_card
from numprune.compensate import LayerFits
from numprune.depth import check_depth, select_layers, shallower_config
from numprune.errors import NumpruneError
from numprune.heal import HealRecord, check_healable, heal_layers, healed_report, streamed_options
from numprune.io.output import check_target, output_folder
from numprune.models import (
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    check_finite,
    check_model_folder,
    check_weights_fit,
    load_config,
)
from numprune.pipeline import (
    Compute,
    build_report,
    check_run,
    check_tokens,
    compensate,
    healing_for,
    layers_only_report,
    resolve,
    select,
)
from numprune.precision import check_device
from numprune.recipe import FLAG, HealOptions, PruneOptions, heal_fields
from numprune.report import Clock, PruneReport, counted_from_dense, parameter_counts
from numprune.save import REPORT_NAME, read_report
from numprune.shrink import narrowed
from numprune.sources import LayerSource

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# Files copied beside the pruned weights as they are (the tokenizer's, and generation defaults).
SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "added_tokens.json", "generation_config.json")


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and peak RSS creeps up layer by layer)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _allocate_large_blocks_apart() -> None:
    """Serve blocks of 1 MiB and more with their own mappings, returned to the OS when freed.

    glibc raises its mmap threshold each time such a block is freed, after which layer-sized
    tensors come from the heap and stay resident; a fixed threshold (as MALLOC_MMAP_THRESHOLD_
    would set) keeps peak memory at about one layer's work.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def check_folder(folder: str | os.PathLike) -> Path:
    """``folder`` if it holds a config transformers accepts and safetensors weights; else one clear error, before
    any work (the in-memory load's checks)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NumpruneError(f"streaming needs a local model folder; {folder} is not one")
    check_model_folder(folder)
    load_config(folder)
    side_files(folder)
    return folder


def side_files(folder: Path) -> list[Path]:
    """The side files of ``folder`` that are copied beside the pruned weights as they are. A link may point
    within the folder, or within its Hugging Face cache repository (a snapshot's files link into its
    ``blobs/``), but nowhere else: a hostile folder could otherwise pull any readable file into the output."""
    home = Path(os.path.realpath(folder))
    if home.parent.name == "snapshots" and home.parent.parent.name.startswith("models--"):
        home = home.parent.parent
    found = []
    for path in (folder / name for name in SIDE_FILES):
        if not path.is_file():
            continue
        real = Path(os.path.realpath(path))
        if home not in real.parents:
            raise NumpruneError(f"{path} links to {real}, outside the model folder; copy the file into the folder")
        found.append(path)
    return found


def load_tokenizer(folder: Path):
    """The tokenizer saved in ``folder`` (for drawing calibration windows)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise NumpruneError(f"model {folder} has no tokenizer; save one beside it")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


class Checkpoint:
    """The tensors of a safetensors folder (one file, or shards with an index), read a few at a time.

    Files are memory-mapped only while tensors are read from them: a mapping kept open would keep
    every page ever read resident, and the process would end up holding the whole model.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / WEIGHTS_INDEX).is_file():  # check_model_folder has checked it
            self.weight_map: dict[str, str] = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        else:
            with self._open(WEIGHTS_FILE) as f:
                self.weight_map = dict.fromkeys(f.keys(), WEIGHTS_FILE)

    def _open(self, file: str):
        path = self.folder / file
        try:
            return safe_open(path, "pt")
        except (OSError, SafetensorError) as e:
            raise NumpruneError(f"cannot read safetensors file {path}: {e}") from None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``: views of the files' pages, which stay mapped only while a tensor lives."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise NumpruneError(f"the checkpoint has no tensor {missing[0]!r} (streaming needs the checkpoint's tensor "
                                "names to match the model's)")
        tensors = {}
        for file in sorted({self.weight_map[n] for n in names}):
            with self._open(file) as f:
                tensors |= {n: f.get_tensor(n) for n in names if self.weight_map[n] == file}
        check_finite(tensors, self.folder)
        return tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers only."""
        shapes = {}
        for file in sorted(set(self.weight_map.values())):
            with self._open(file) as f:
                shapes |= {n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if self.weight_map.get(n) == file}
        return shapes

    def dtype(self) -> torch.dtype:
        """The dtype most of the tensors have (read from the file headers only)."""
        names = Counter()
        for file in sorted(set(self.weight_map.values())):
            with self._open(file) as f:
                names.update(f.get_slice(n).get_dtype() for n in f.keys())
        name = names.most_common(1)[0][0]
        if name not in SAFETENSORS_DTYPES:
            raise NumpruneError(f"cannot prune weights stored as {name}")
        return SAFETENSORS_DTYPES[name]


class StreamedModel(LayerSource):
    """The layer source (numprune.sources) of a model whose layers wait on disk until visited."""

    def __init__(self, folder: str | os.PathLike, clock: Clock):
        self.folder = check_folder(folder)
        self.checkpoint = Checkpoint(self.folder)
        config = load_config(self.folder)
        from accelerate import init_empty_weights

        self.dtype = self.checkpoint.dtype()
        with init_empty_weights(include_buffers=False), no_init_weights():  # buffers (rotary tables) are real
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        self.model.tie_weights()
        expected = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        check_weights_fit(self.folder, mismatched=[(n, shape, expected[n]) for n, shape in self.checkpoint.shapes().items()
                                                   if n in expected and shape != expected[n]])
        self.adapter = adapter_for(self.model)
        modules = {id(m): name for name, m in self.model.named_modules()}
        self.layers_prefix = modules[id(self.adapter.layers())] + "."
        output = self.model.get_output_embeddings()
        self.output_prefix = modules[id(output)] + "." if output is not None else None
        self.clock = clock
        self.out: Path | None = None  # set while the output is written; None on processes that do not write
        self.weight_map: dict[str, str] = {}
        self.shifted = (False, False)  # whether a fit shifts some attention / MLP output projection's bias

    def _shard(self, number: int, count: int) -> str:
        return f"model-{number:05d}-of-{count:05d}.safetensors"

    @contextmanager
    def _loaded(self, module: nn.Module, prefix: str, names: list[str]) -> Iterator[None]:
        """``module``'s tensors ``names`` read from the checkpoint (``prefix`` + name) while the block runs."""
        self._load(module, prefix, names)
        try:
            yield
        finally:
            self._free(module)

    def _load(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        with self.clock.timed("loading"):
            tensors = self.checkpoint.read([prefix + n for n in names])
            module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)

    @staticmethod
    def _free(module: nn.Module) -> None:
        """``module`` back to meta, with whatever a block added (a compensation bias): memory is freed."""
        state = module.state_dict()
        module.load_state_dict({n: torch.empty_like(t, device="meta") for n, t in state.items() if not t.is_meta},
                               strict=False, assign=True)
        del state
        _release_freed_memory()

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        layer = self.adapter.layers()[i]
        with self._loaded(layer, f"{self.layers_prefix}{i}.", list(layer.state_dict())):
            yield layer

    @contextmanager
    def inputs(self) -> Iterator[None]:
        """The modules outside the decoder layers (but the output head), loaded while the block runs."""
        names = [n for n in self.model.state_dict() if not n.startswith(self.layers_prefix)
                 and not (self.output_prefix and n.startswith(self.output_prefix))]
        with self._loaded(self.model, "", names):
            yield

    @contextmanager
    def whole_passes(self) -> Iterator[None]:
        """Whole forward passes with one decoder layer in memory: each layer read from disk when the forward reaches
        it and freed after it (every batch reads every layer again), the modules outside the layers loaded
        throughout (the output head never is: run the base model)."""
        handles = []
        for i, layer in enumerate(self.adapter.layers()):
            names = list(layer.state_dict())
            handles.append(layer.register_forward_pre_hook(
                lambda module, args, prefix=f"{self.layers_prefix}{i}.", names=names: self._load(module, prefix, names)))
            handles.append(layer.register_forward_hook(lambda module, args, out: self._free(module)))
        try:
            with self.inputs():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def mlp_output_weight(self, i: int) -> torch.Tensor:
        """Layer ``i``'s MLP output projection weight ``[out, in]``, read from disk."""
        layer = self.adapter.layers()[i]
        name = f"{self.adapter.modules.mlp_output}.weight"
        with self._loaded(layer, f"{self.layers_prefix}{i}.", [name]):
            return projection_weight(self.adapter.mlp_output(layer)).detach().clone()

    def write_without_layers(self, removed: list[int], patch: tuple[int, torch.Tensor] | None, out: Path) -> nn.Module:
        """The dense checkpoint written into ``out`` without the ``removed`` layers, one kept layer at a time: the rest
        renumbered, ``patch`` (layer, weight) the new MLP output projection of that layer, the stock config with
        fewer layers, the side files. Returns the shallower model's skeleton (meta)."""
        layers = self.adapter.num_layers()
        kept = [l for l in range(layers) if l not in set(removed)]
        self.out, self.weight_map = out, {}
        out.mkdir(exist_ok=True)
        for new, old in enumerate(kept):
            prefix = f"{self.layers_prefix}{old}."
            state = self.checkpoint.read([n for n in self.checkpoint.weight_map if n.startswith(prefix)])
            state = {f"{self.layers_prefix}{new}.{n[len(prefix):]}": t for n, t in state.items()}
            if patch is not None and old == patch[0]:
                name = f"{self.layers_prefix}{new}.{self.adapter.modules.mlp_output}.weight"
                state[name] = patch[1].to(state[name].dtype)
            self._write(state, self._shard(new + 1, len(kept) + 1))
        rest = self.checkpoint.read([n for n in self.checkpoint.weight_map if not n.startswith(self.layers_prefix)])
        self._write(rest, self._shard(len(kept) + 1, len(kept) + 1))
        config = shallower_config(self.model.config, kept, layers)
        self._write_config(config)
        with torch.device("meta"), no_init_weights():
            shallow = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        shallow.tie_weights()
        return shallow

    def done(self, i: int, layer: nn.Module, plan: LayerPlan, fits: LayerFits) -> None:
        """Write the layer narrowed with its fits (numprune.shrink.narrowed) to its own shard (on the writing
        process)."""
        self.shifted = tuple(s or fit[1] is not None for s, fit in zip(self.shifted, fits))
        if self.out is None:
            return
        state = {f"{self.layers_prefix}{i}.{n}": t for n, t in layer.state_dict().items()}
        self._write(state | narrowed(self.adapter, i, state, plan, fits), self._shard(i + 1, self.adapter.num_layers() + 1))

    def healed(self, i: int, layer: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
        """Write layer ``i`` to its own shard: its fitted weights ``state`` in the layer's dtypes, or the layer as
        it is (numprune.heal)."""
        own = layer.state_dict()
        state = own if state is None else {n: t.to(own[n].device, own[n].dtype) for n, t in state.items()}
        self._write({f"{self.layers_prefix}{i}.{n}": t for n, t in state.items()},
                    self._shard(i + 1, self.adapter.num_layers() + 1))

    def finish_unchanged(self) -> None:
        """Write the tensors outside the layers, the index and the config as the checkpoint has them (healing
        changes the layers only)."""
        rest = self.checkpoint.read([n for n in self.checkpoint.weight_map if not n.startswith(self.layers_prefix)])
        self._write(rest, self._shard(self.adapter.num_layers() + 1, self.adapter.num_layers() + 1))
        self._write_config(load_config(self.folder))

    def _write(self, state: dict[str, torch.Tensor], shard: str) -> None:
        save_file({n: t.contiguous() for n, t in state.items()}, self.out / shard, metadata={"format": "pt"})
        self.weight_map |= dict.fromkeys(state, shard)

    def finish(self, plans: list[LayerPlan]) -> nn.Module:
        """Write the tensors outside the layers, the index and the config; return the pruned skeleton.

        Biases the pruned config implies but no layer has (q/k/v beside a bias-compensated o_proj)
        are written as zeros, as ``shrink`` does in memory.
        """
        config = self.adapter.pruned_config(plans, self.shifted)
        with torch.device("meta"), no_init_weights():
            pruned = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        pruned.tie_weights()
        rest = self.checkpoint.read([n for n in self.checkpoint.weight_map if not n.startswith(self.layers_prefix)])
        state = pruned.state_dict()
        expected = {n for n, _ in pruned.named_parameters()} | {n for n, _ in pruned.named_buffers() if n in state}
        missing = expected - set(self.weight_map) - set(rest)
        unexpected = set(self.weight_map) - set(state)
        if unexpected or any(not n.endswith(".bias") for n in missing):
            raise RuntimeError(f"pruned tensors do not fit the pruned config: {sorted(missing | unexpected)}")
        rest |= {n: torch.zeros(state[n].shape, dtype=state[n].dtype) for n in missing}
        self._write(rest, self._shard(self.adapter.num_layers() + 1, self.adapter.num_layers() + 1))
        self._write_config(config)
        return pruned

    def _write_config(self, config) -> None:
        """The index of the shards written, ``config`` and the side files, into the output."""
        total = sum((self.out / f).stat().st_size for f in set(self.weight_map.values()))
        (self.out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                       "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
        config.dtype = self.dtype
        config.save_pretrained(self.out)
        for path in side_files(self.folder):
            if not (self.out / path.name).exists():
                shutil.copy2(path, self.out / path.name)


def prune_streaming(folder: str | os.PathLike, tokens: torch.Tensor, recipe: PruneOptions | None = None, *,
                    out: str | os.PathLike,
                    overwrite: bool = False, tokenizer=None, batch_size: int = 8, progress: bool = True,
                    calibration_info: dict | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, **overrides) -> PruneReport | None:
    """Prune the safetensors model in ``folder`` into ``out`` without ever loading it whole; return the report.

    Same recipe and overrides and same result as ``numprune.prune`` on the loaded model followed by
    ``save_pruned``; as there, the layer passes run on ``device``, by default the model's own: the CPU,
    where the weights are read. ``tokenizer`` is saved beside the weights if given (else the folder's
    tokenizer files are copied). In a process group only process 0 writes ``out`` and gets the
    report; the others get None. A recipe with ``depth`` removes layers first (``_depth_first``).
    """
    opts = resolve(recipe, overrides, tokens, None)
    if opts.allocation == AUTO:
        raise NumpruneError("the auto allocation measures whole candidate models on held-out text, and streaming "
                            "never holds the whole model: choose another allocation, such as blend")
    FLAG.check("overwrite", overwrite)
    _allocate_large_blocks_apart()
    world = distributed.world()
    if opts.depth and world.size > 1:
        raise NumpruneError("a streamed run removes layers in one process; run it without torchrun")
    if opts.depth and opts.depth_selection == "scattered":
        raise NumpruneError("the scattered depth selection fits each run's patch on the model without the earlier "
                            "runs, which a streamed run does not do yet: choose patched or shortgpt, or prune in memory")
    if world.writer:
        check_target(out, overwrite=overwrite, inputs=[folder], marker=REPORT_NAME)
    compute = Compute(batch_size, progress, device, dtype)
    clock = Clock(compute.device)  # the model's own device is the CPU: no GPU memory to track then
    source = StreamedModel(folder, clock)
    opts = healing_for(source.adapter, opts)
    if opts.heal:  # block-local: the one healing that holds a layer at a time
        opts = opts.replace(**heal_fields(streamed_options(opts.heal_options())))
    before = parameter_counts(source.adapter)
    if opts.depth:
        check_depth(source.adapter, opts.depth)
        check_tokens(source.adapter, tokens)
        if opts.ratio:  # on the dense model's shapes, before any work; again on the shallower model's after
            check_run(source.adapter, tokens, None, opts.width_step())
    else:
        check_run(source.adapter, tokens, None, opts)
        plans, stats = select(source, tokens, None, opts, compute, clock)
        if not world.writer and opts.compensation_stats == "dense":
            return None  # compensation needs no other process: process 0 does it alone
    writer = output_folder(out, overwrite=overwrite, inputs=[folder], marker=REPORT_NAME)
    with writer if world.writer else nullcontext() as tmp:
        pruned = tmp
        if opts.heal and tmp is not None:  # pruned into a folder of its own, healed from there into ``tmp``
            pruned = tmp / UNHEALED
            pruned.mkdir()
        if opts.depth:
            report = _depth_first(source, tokens, opts, tmp, compute, clock, calibration_info, before)
        else:
            report = _width(source, plans, stats, tokens, opts, pruned, compute, clock, calibration_info, before)
        if report is None:
            return None
        if opts.heal:
            _heal_pruned(source, pruned, tokens, opts.heal_options(), tmp, compute, clock, report)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.model = str(source.folder.resolve())
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        write_pruned_card(tmp, report, str(folder))
    return report


# Where a streamed run that heals writes the pruned checkpoint, inside the output's temporary folder, for the
# healing that reads it (and writes the healed one beside it); removed after.
UNHEALED = "unhealed"


def _heal_pruned(dense: StreamedModel, pruned: Path, tokens: torch.Tensor, opts: HealOptions, out: Path,
                 compute: Compute, clock: Clock, report: PruneReport) -> None:
    """Heal the checkpoint just pruned into ``pruned`` toward the dense model ``dense`` was read from (afresh: the
    pruning run may have left its skeleton changed) into ``out``, then remove it; the report gets the healing's
    record, time and memory, as ``numprune.prune``'s does."""
    with clock.timed("healing"):
        record = _heal_into(StreamedModel(dense.folder, clock), StreamedModel(pruned, clock), tokens, opts, out,
                            compute.device, compute.progress)
    shutil.rmtree(pruned)
    report.healing = record.to_json()
    report.time_s, report.peak_rss_bytes, report.peak_gpu_bytes = clock.times(), clock.peak_rss, clock.peak_gpu


def _heal_into(dense: StreamedModel, pruned: StreamedModel, tokens: torch.Tensor, opts: HealOptions, out: Path,
               device: torch.device | None, progress: bool) -> HealRecord:
    """Block-local healing of ``pruned`` toward ``dense`` (numprune.heal's loop, one layer of each in memory), each
    healed layer written into ``out`` as it is done, then the rest of the pruned checkpoint; its record."""
    start = time.perf_counter()
    pruned.out, pruned.weight_map = out, {}
    layers = heal_layers(dense, pruned, tokens, device or torch.device("cpu"), opts, progress)
    pruned.finish_unchanged()
    return HealRecord(opts, layers, int(tokens.numel()), time.perf_counter() - start)


def heal_streaming(dense_folder: str | os.PathLike, pruned_folder: str | os.PathLike, tokens: torch.Tensor, /, *,
                   out: str | os.PathLike, overwrite: bool = False, progress: bool = True,
                   device: torch.device | str | None = None, calibration_info: dict | None = None,
                   **options) -> dict:
    """Heal the pruned model saved in ``pruned_folder`` toward the dense one in ``dense_folder`` into ``out``,
    block-local (the ``local`` mode), never loading either whole; return the report written beside it.

    Same options (HealOptions' fields) and same weights as ``numprune.heal`` in the local mode on the two loaded
    models: the layer passes and fits run on ``device`` (default: the CPU) in float32, and each healed layer is
    written in the pruned checkpoint's dtype. The report is the pruned folder's, its recipe and ``healing`` record
    updated (with ``calibration_info``, what the ``tokens`` were drawn from).
    """
    opts = streamed_options(HealOptions.checked(**options))
    FLAG.check("overwrite", overwrite)
    where = check_device(device)
    report = read_report(pruned_folder)
    if report is None:
        raise NumpruneError(f"{pruned_folder} has no {REPORT_NAME}: heal a folder numprune pruned")
    folders = [Path(f).expanduser() for f in (dense_folder, pruned_folder)]
    if folders[0].resolve() == folders[1].resolve():
        raise NumpruneError("the dense and the pruned model are the same model; heal a pruned copy")
    check_target(out, overwrite=overwrite, inputs=folders, marker=REPORT_NAME)
    _allocate_large_blocks_apart()
    clock = Clock(where)
    dense, pruned = StreamedModel(folders[0], clock), StreamedModel(folders[1], clock)
    check_healable(dense, pruned, tokens)  # before the output's temporary folder is made
    with output_folder(out, overwrite=overwrite, inputs=folders, marker=REPORT_NAME) as tmp:
        record = _heal_into(dense, pruned, tokens, opts, tmp, where, progress)
        extra = {"calibration": calibration_info} if calibration_info is not None else {}
        report = healed_report(report, record, **extra, dense_model=str(dense.folder.resolve()))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        write_pruned_card(tmp, report, str(pruned.folder))
    return report


def _width(source: StreamedModel, plans: list[LayerPlan], stats, tokens: torch.Tensor, opts: PruneOptions,
           out: Path | None, compute: Compute, clock: Clock, calibration_info: dict | None,
           before: dict) -> PruneReport | None:
    """Compensate the selected plans and write the narrower model into ``out`` (None on the processes that do not
    write, which get None); its report."""
    source.out = out
    compensate(source, plans, stats, tokens, opts, compute, clock)
    if out is None:
        return None
    with clock.timed("surgery"):
        pruned = source.finish(plans)
    return build_report(opts, tokens, calibration_info, before, pruned, plans, clock,
                        compute.describe(source.adapter, streaming=True))


# Where the shallower checkpoint waits, inside the output's temporary folder, for the width step that reads it.
SHALLOW = "without-layers"


def _depth_first(source: StreamedModel, tokens: torch.Tensor, opts: PruneOptions, out: Path, compute: Compute,
                 clock: Clock, calibration_info: dict | None, before: dict) -> PruneReport:
    """Remove ``opts.depth`` layers with about one layer in memory, then (with a ratio) prune the width of the rest
    as any streamed run; one report for both, as ``numprune.prune``'s.

    The statistics follow each calibration batch through every layer (numprune.depth, each layer read from disk
    as the forward reaches it); the chosen layers go as the dense checkpoint is rewritten layer by layer
    (``write_without_layers``), into ``out`` for depth alone, else into a folder inside it that the width step
    reads and that is removed after.
    """
    with clock.timed("depth"):
        with source.whole_passes():
            record, weight = select_layers(source.model, tokens, opts.depth, opts.depth_selection, opts.depth_ridge,
                                           compute.batch_size, compute.progress, weight_of=source.mlp_output_weight)
        patch = (record.patched_layer, weight) if weight is not None else None
        shallow = out if opts.ratio == 0 else out / SHALLOW
        skeleton = source.write_without_layers(record.removed_layers, patch, shallow)
    middle = parameter_counts(adapter_for(skeleton))
    if opts.ratio == 0:
        report = layers_only_report(opts, tokens, calibration_info, before, skeleton, clock,
                                    compute.describe(adapter_for(skeleton), streaming=True))
    else:
        width = opts.width_step()
        narrow = StreamedModel(shallow, clock)
        check_run(narrow.adapter, tokens, None, width)
        plans, layer_stats = select(narrow, tokens, None, width, compute, clock)
        report = _width(narrow, plans, layer_stats, tokens, width, out, compute, clock, calibration_info, middle)
        report.options = opts
        shutil.rmtree(shallow)
    report.parameters = counted_from_dense(report.parameters, before, middle, opts.ratio)
    report.depth = record.to_json()
    return report
