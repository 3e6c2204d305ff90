"""The recipe of a pruning run (method, allocation, compensation, statistics, options), checked in one place.

``PruneOptions`` holds it, immutable: constructing it fills in the method's defaults and checks every
option, once, whether it came from Python, from the command line, from a recipe file (``read_recipe``) or
from a ``method:key=value`` string (``PruneOptions.parse``, which casts each value to its declared type: a
PruneOptions field's or a keyword-only parameter of the method's criterion). The rules a number must follow (``Rule``) are
stated here once; the command line's argument converters are built from the same rules.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_args, get_type_hints

import torch
import yaml

from numprune import compensate
from numprune.allocate import ALLOCATIONS, AUTO, GQA_UNITS, blend_schedule
from numprune.criteria import get_method
from numprune.depth import DEFAULT_RIDGE, SELECTIONS
from numprune.errors import NumpruneError

COMPENSATION_STATS = ("dense", "sequential")
HEAL_PARAMS = ("all", "norms")  # healing fits every kept weight of a layer, or its norms and biases only
HEAL_LOSSES = ("mse", "relative")  # on the block's output; or each sub-block's error over its dense output's energy
# block-local fits (numprune.heal), distillation of the dense model's next-token distribution (numprune.distill), or both
HEAL_MODES = ("local", "distill", "local+distill")
# distillation's budget in calibration tokens unless one is given (at most one pass over them): about one calibration
# pass of SmolLM2's time on 2 cores, validated on SmolLM2 and Gemma 3 (docs/method.md, "Healing")
DISTILL_TOKENS = 12_288
GUIDED_BY_COMPENSATION = "compensated-error"  # the allocation that ranks by a compensation's error curves
MAX_SEED = 2**32 - 1  # seeds torch and numpy both take
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def is_number(value) -> bool:
    """A real number that is not NaN (and not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def plain(value):
    """A numpy or torch scalar as the Python number it holds (it is a number; the rules test Python's types);
    anything else as it is."""
    if torch.is_tensor(value) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        return value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value) not in (int, float):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def number_from_text(text: str, kind: type):
    """``kind(text)`` for int or float, refusing underscores (ValueError): Python reads ``0_5`` as 5, which is
    never what a typed 0_5 meant."""
    if "_" in text:
        raise ValueError(text)
    return kind(text)


def is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count or a seed here)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What a number must be: ``kind`` (what the command line parses the text as), a test, and its wording."""

    kind: type
    accepts: Callable[[object], bool]
    says: str

    def check(self, name: str, value) -> None:
        if not self.accepts(value):
            raise NumpruneError(f"{name} must be {self.says}, got {value!r}")


POSITIVE_INT = Rule(int, lambda v: is_int(v) and v >= 1, "a positive integer")
NONNEGATIVE_INT = Rule(int, lambda v: is_int(v) and v >= 0, "an integer >= 0")
SEED = Rule(int, lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer between 0 and {MAX_SEED}")
NONNEGATIVE = Rule(float, lambda v: is_number(v) and 0 <= v < math.inf, "a finite number >= 0")
POSITIVE = Rule(float, lambda v: is_number(v) and 0 < v < math.inf, "a finite number > 0")
RATIO = Rule(float, lambda v: is_number(v) and 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
SHARE = Rule(float, lambda v: is_number(v) and 0.0 <= v <= 1.0, "between 0 and 1")
FLAG = Rule(bool, lambda v: isinstance(v, bool), "True or False")
# The criteria's keyword options that are numbers, by name (every criterion that takes one means the same by it).
SCORE_OPTION_RULES = {"iterations": POSITIVE_INT, "damp": NONNEGATIVE, "lambda_rel": NONNEGATIVE, "seed": SEED}


@dataclass(frozen=True)
class HealOptions:
    """How numprune.heal fits each pruned layer to the dense layer's output, and how it distils the dense model
    into the pruned one (defaults chosen on validation text). ``mode`` and ``epochs`` may be left to the run
    (None): ``decided`` completes them."""

    lr: float = 3e-4  # Adam's learning rate at the start; it decays to 0 along a cosine over the steps
    # passes over the calibration windows per layer (None: 1); distillation: in all, in place of its token budget
    epochs: int | None = None
    batch: int = 1  # calibration windows per Adam step (both modes)
    params: str = "all"  # HEAL_PARAMS
    loss: str = "relative"  # HEAL_LOSSES
    seed: int = 0  # the order windows are visited in (and LoRA's initial matrices)
    # HEAL_MODES; None: distill where its training fits in memory, else local (numprune.heal.decide_mode)
    mode: str | None = None
    distill_lr: float = 1e-4  # distillation's AdamW learning rate at the start, decaying to 0 along a cosine
    tokens: int | None = None  # distillation's budget in calibration tokens (None: DISTILL_TOKENS, unless minutes or epochs)
    minutes: float | None = None  # distillation's budget in wall minutes (the schedule follows the clock): not reproducible
    lora_rank: int = 0  # distillation trains LoRA adapters of this rank (merged back after); 0: the full kept weights
    hidden: float = 0.0  # distillation's weight of the layer outputs' relative error beside the KL (0: the KL alone)

    @classmethod
    def checked(cls, **options) -> HealOptions:
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise NumpruneError(f"unknown healing option {unknown[0]!r}; the options are "
                                f"{', '.join(f.name for f in fields(cls))}")
        opts = cls(**{name: plain(value) for name, value in options.items()})
        POSITIVE.check("healing learning rate", opts.lr)
        POSITIVE.check("distillation learning rate", opts.distill_lr)
        NONNEGATIVE_INT.check("LoRA rank", opts.lora_rank)
        NONNEGATIVE.check("distillation hidden-state weight", opts.hidden)
        for budget, rule, what in ((opts.tokens, POSITIVE_INT, "tokens"), (opts.minutes, POSITIVE, "minutes")):
            if budget is not None:
                rule.check(f"distillation budget in {what}", budget)
        if opts.epochs is not None:
            POSITIVE_INT.check("healing epochs", opts.epochs)
        POSITIVE_INT.check("healing batch", opts.batch)
        SEED.check("healing seed", opts.seed)
        for value, allowed, what in ((opts.params, HEAL_PARAMS, "healing parameters"),
                                     (opts.loss, HEAL_LOSSES, "healing loss"), (opts.mode, HEAL_MODES, "healing mode")):
            if value not in allowed and not (what == "healing mode" and value is None):
                raise NumpruneError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        given = [name for name, value in (("tokens", opts.tokens), ("minutes", opts.minutes), ("lora_rank", opts.lora_rank),
                                          ("hidden", opts.hidden)) if value not in (None, 0)]
        if opts.mode is None:  # options of one mode's alone, set away from their defaults, ask for that mode
            local = any(getattr(opts, name) != getattr(cls, name) for name in ("lr", "params", "loss"))
            implied = {(True, True): "local+distill", (True, False): "local", (False, True): "distill"}.get(
                (local, bool(given)))
            return cls.checked(**{**asdict(opts), "mode": implied}) if implied else opts
        if given and "distill" not in opts.mode:
            raise NumpruneError(f"the healing option {given[0]} applies to distillation; the {opts.mode} mode does not "
                                f"distil (choose {' or '.join(m for m in HEAL_MODES if 'distill' in m)})")
        return opts

    def decided(self, fallback: str, calibration_tokens: int | None = None) -> HealOptions:
        """These options with what they left to the run filled in: the mode ``fallback`` unless they name one, one
        block-local epoch, and distillation's budget, unless tokens, minutes or epochs say: DISTILL_TOKENS, at most
        one pass over the ``calibration_tokens`` (a default never trains on a window twice)."""
        mode = self.mode or fallback
        budget = self.tokens
        if "distill" in mode and budget is None and self.minutes is None and self.epochs is None:
            budget = min(DISTILL_TOKENS, calibration_tokens or DISTILL_TOKENS)
        return HealOptions.checked(**{**asdict(self), "mode": mode, "epochs": self.epochs or 1, "tokens": budget})


# the HealOptions a PruneOptions carries as heal_<name>
HEAL_FIELDS = ("lr", "epochs", "batch", "params", "loss", "mode", "distill_lr", "tokens", "minutes", "lora_rank",
               "hidden")


def heal_fields(options: HealOptions) -> dict:
    """``options`` as the PruneOptions fields that carry them (heal_<name>)."""
    return {f"heal_{name}": getattr(options, name) for name in HEAL_FIELDS}


DEFAULT_METHOD = "numerical-robust"  # the API's, the command line's and compare's (docs/method.md, "The default method")


@dataclass(frozen=True)
class PruneOptions:
    """Everything that decides a pruning run's result (recorded verbatim in the report).

    Immutable and complete once constructed: the method's defaults are filled in and every field is
    checked here, once; nothing downstream checks an option again. ``replace`` gives a changed copy.
    """

    ratio: float
    method: str = DEFAULT_METHOD
    allocation: str | None = None  # None: the method's own (see criteria.methods)
    gqa_unit: str = "query"
    round_to: int = 1
    compensation: str | None = None  # None: the method's own
    compensation_stats: str = "dense"
    compensation_damp: float | None = None  # None: the method's own with its compensation, else 0.01
    allocation_compensation: str | None = None  # compensated-error: whose error curves guide it (None: the run's own)
    blend_weight: float | None = None  # blend: the share of the global ranking's widths (None: the ratio's schedule)
    score_options: dict = field(default_factory=dict)  # the criterion's keyword options (unset: its own defaults)
    heal: bool | None = None  # healing after pruning (numprune.heal); None: the method's own, decided by the run
    # (decide_healing); the heal_* options are its
    heal_lr: float | None = None
    heal_epochs: int | None = None
    heal_batch: int | None = None
    heal_params: str | None = None
    heal_loss: str | None = None
    depth: int = 0  # whole decoder layers removed before the width step (numprune.depth); with ratio 0, alone
    depth_selection: str | None = None  # depth's SELECTIONS; None: the first (with depth)
    depth_ridge: float | None = None  # the depth patch's ridge; None: depth's DEFAULT_RIDGE (with depth)
    heal_mode: str | None = None
    heal_distill_lr: float | None = None
    heal_tokens: int | None = None
    heal_minutes: float | None = None
    heal_lora_rank: int | None = None
    heal_hidden: float | None = None

    def __post_init__(self):
        _resolve(self, lambda name, value: object.__setattr__(self, name, value))

    @classmethod
    def checked(cls, ratio: float | None = None, **options) -> PruneOptions:
        """Options from keyword arguments (the fields); an unknown name is refused."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise NumpruneError(f"unknown option {unknown[0]!r}; the options are "
                                f"{', '.join(f.name for f in fields(cls) if f.name != 'ratio')}")
        return cls(ratio=ratio, **options)

    @classmethod
    def parse(cls, entry: str, ratio: float) -> PruneOptions:
        """Options from ``name:key=value:...``, every value cast to its declared type."""
        name, *overrides = entry.strip().split(":")
        prune_options, score_options = option_types(name.strip())
        declared = prune_options | score_options
        options, score = {}, {}
        for item in overrides:
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in declared:
                raise NumpruneError(f"bad method option {item!r} in {entry!r}; use key=value with key in: "
                                    f"{', '.join(sorted(declared))}")
            if key in options or key in score:
                raise NumpruneError(f"{entry!r} sets {key} twice")
            try:
                (score if key in score_options else options)[key] = _cast(declared[key], value.strip())
            except ValueError:
                raise NumpruneError(f"bad value {value!r} for {key} in {entry!r}") from None
        if score:
            options["score_options"] = score
        return cls.checked(ratio, method=name, **options)

    def requested(self) -> dict:
        """The fields that differ from what the others imply (the method's defaults, the ratio's blend weight):
        the shortest keyword arguments that construct these options again. A value equal to its default counts
        as the default."""
        given = asdict(self)
        for name in (*(f"heal_{n}" for n in HEAL_FIELDS), *DERIVED, "gqa_unit", "round_to", "compensation_stats",
                     *DEPTH_FIELDS[1:]):
            trial = {**given, name: _FIELD_DEFAULTS[name]}
            if _quietly(trial) == self:
                given = trial
        criterion_defaults = keyword_defaults(get_method(self.method).criterion)
        given["score_options"] = {k: v for k, v in self.score_options.items() if criterion_defaults.get(k, v) != v
                                  or k in get_method(self.method).score_options}
        return {k: v for k, v in given.items() if k == "ratio" or v != _FIELD_DEFAULTS[k]}

    def replace(self, **changes) -> PruneOptions:
        """These options with ``changes``; what the changed fields imply (the method's defaults, the ratio's
        blend weight) is derived again unless these options set it to something else."""
        return PruneOptions.checked(**{**self.requested(), **changes})

    def width_step(self) -> PruneOptions:
        """These options without the depth options: the width step's recipe, run on the depth-pruned model (which
        does not heal: healing after depth pruning is refused)."""
        return self.replace(depth=0, depth_selection=None, depth_ridge=None, heal=False)

    def decide_healing(self, allowed: bool) -> PruneOptions:
        """These options with healing decided where they leave it to the method (``heal`` None): the method's own,
        never after depth pruning, and only where the run ``allowed`` it (it has tokens to train on, its family
        heals by default). Healing asked for (``heal=True``, or a healing option) stays asked for."""
        if self.heal is not None:
            return self
        return self.replace(heal=allowed and get_method(self.method).heal and not self.depth)

    def heal_options(self) -> HealOptions:
        """The resolved healing options (when ``heal``)."""
        return HealOptions.checked(**{name: getattr(self, f"heal_{name}") for name in HEAL_FIELDS})

    def compensation_options(self, name: str | None = None):
        """The resolved options of compensation ``name`` (default: the run's), as its registry entry declares them."""
        options = compensate.REGISTRY[name or self.compensation].options
        return options(**{f.name: getattr(self, f.name) for f in fields(options)})


# The fields whose default another field implies: the method's allocation and compensation, the ratio's blend weight.
DERIVED = ("allocation", "compensation", "compensation_damp", "allocation_compensation", "blend_weight")
DEPTH_FIELDS = ("depth", "depth_selection", "depth_ridge")
WIDTH_ONLY = "none"  # the allocation and compensation of a run that removes layers only (ratio 0)
_FIELD_DEFAULTS = {f.name: {} if f.name == "score_options" else f.default for f in fields(PruneOptions)}


def _quietly(options: dict) -> PruneOptions | None:
    """PruneOptions from ``options``, or None where they are refused."""
    try:
        return PruneOptions(**options)
    except NumpruneError:
        return None


def _resolve(opts: PruneOptions, put: Callable[[str, object], None]) -> None:
    """Check every option of ``opts`` and fill in the method's defaults (``put`` sets a field of the frozen options)."""
    for name in ("method", "allocation", "gqa_unit", "compensation", "compensation_stats", "allocation_compensation"):
        value = getattr(opts, name)
        if not isinstance(value, str) and (value is not None or name == "method"):  # None: the method's own
            raise NumpruneError(f"{name} must be a name, got {value!r}")
    if not isinstance(opts.score_options, dict):
        raise NumpruneError(f"score options must be a dict, got {opts.score_options!r}")
    for name in ("ratio", "round_to", "compensation_damp", "blend_weight"):
        put(name, plain(getattr(opts, name)))
    _resolve_depth(opts, put)
    if not is_number(opts.ratio):
        raise NumpruneError(f"ratio must be a number, got {opts.ratio!r}")
    if opts.depth and opts.ratio == 0:
        _resolve_depth_only(opts, put)
        return
    RATIO.check("ratio", opts.ratio)
    method = get_method(opts.method)
    own_compensation = opts.compensation in (None, method.compensation)
    put("allocation", opts.allocation or method.allocation)
    put("compensation", opts.compensation or method.compensation)
    if opts.compensation not in compensate.REGISTRY:
        raise NumpruneError(f"unknown compensation {opts.compensation!r}; choose from "
                            f"{', '.join(compensate.COMPENSATIONS)}")
    if opts.allocation == GUIDED_BY_COMPENSATION:  # the one allocation a compensation guides (None for the others)
        put("allocation_compensation", opts.allocation_compensation or opts.compensation)
        if opts.allocation_compensation not in compensate.REGISTRY:
            raise NumpruneError(f"unknown compensation {opts.allocation_compensation!r} for the allocation; "
                                f"choose from {', '.join(compensate.COMPENSATIONS)}")
    elif opts.allocation_compensation is not None:
        raise NumpruneError(f"an allocation compensation guides the {GUIDED_BY_COMPENSATION} allocation only, "
                            f"not {opts.allocation}")
    if opts.compensation_damp is None:  # the method's own damping goes with its own compensation
        put("compensation_damp", method.compensation_damp if own_compensation else compensate.Damped.compensation_damp)
    for value, allowed, what in ((opts.allocation, (*ALLOCATIONS, AUTO), "allocation"),
                                 (opts.gqa_unit, GQA_UNITS, "GQA unit"),
                                 (opts.compensation_stats, COMPENSATION_STATS, "compensation statistics")):
        if value not in allowed:
            raise NumpruneError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
    NONNEGATIVE.check("compensation damping", opts.compensation_damp)
    if opts.allocation == "blend":
        put("blend_weight", blend_schedule(opts.ratio) if opts.blend_weight is None else opts.blend_weight)
        SHARE.check("blend weight", opts.blend_weight)
    elif opts.blend_weight is not None:
        raise NumpruneError(f"a blend weight applies to the blend allocation only, not to {opts.allocation}")
    if opts.allocation == AUTO and opts.compensation_stats == "sequential":
        raise NumpruneError("the auto allocation compensates every candidate from the one calibration's dense "
                            "statistics; sequential statistics would calibrate again for each")
    POSITIVE_INT.check("round_to", opts.round_to)
    given = {name: plain(value) for name, value in opts.score_options.items()}
    _check_score_options(opts.method, given)
    merged = {**keyword_defaults(method.criterion), **method.score_options, **given}
    put("score_options", {name: merged[name] for name in score_option_names(method.criterion) if name in merged})
    _resolve_healing(opts, put)
    if opts.depth and opts.heal:
        raise NumpruneError("healing after depth pruning is not supported; heal a width-only run")


def _resolve_depth(opts: PruneOptions, put: Callable[[str, object], None]) -> None:
    """The depth options, checked and completed with numprune.depth's defaults; without depth, refused. Without a
    ratio, depth alone (ratio 0). The model-dependent checks (a family whose layers can be patched, fewer layers
    than it has) are numprune.depth.check_depth's, at prune time."""
    put("depth", plain(opts.depth))
    NONNEGATIVE_INT.check("depth", opts.depth)
    if not opts.depth:
        given = [name for name in DEPTH_FIELDS[1:] if getattr(opts, name) is not None]
        if given:
            raise NumpruneError(f"{given[0]} is a depth option; it applies only with depth > 0 (layers to remove)")
        return
    if opts.ratio is None:
        put("ratio", 0.0)
    put("depth_selection", opts.depth_selection or SELECTIONS[0])
    if opts.depth_selection not in SELECTIONS:
        raise NumpruneError(f"unknown depth selection {opts.depth_selection!r}; choose from {', '.join(SELECTIONS)}")
    put("depth_ridge", DEFAULT_RIDGE if opts.depth_ridge is None else plain(opts.depth_ridge))
    NONNEGATIVE.check("depth ridge", opts.depth_ridge)


def _resolve_depth_only(opts: PruneOptions, put: Callable[[str, object], None]) -> None:
    """A run that removes layers only: the width options mean nothing, so any set is refused (a recipe read back
    from such a run's report holds WIDTH_ONLY as its allocation and compensation)."""
    recorded = {"allocation": WIDTH_ONLY, "compensation": WIDTH_ONLY, "heal": False}  # what such a run's report holds
    for f in fields(PruneOptions):
        value, default = getattr(opts, f.name), _FIELD_DEFAULTS[f.name]
        if f.name in ("ratio", *DEPTH_FIELDS) or value == default or value == recorded.get(f.name, default):
            continue
        raise NumpruneError(f"{f.name} applies to width pruning, which a ratio of 0 skips (depth alone)")
    put("allocation", WIDTH_ONLY)
    put("compensation", WIDTH_ONLY)


def _resolve_healing(opts: PruneOptions, put: Callable[[str, object], None]) -> None:
    """Healing (asked for where options of it are given; unset, the run decides: PruneOptions.decide_healing) and its
    options, checked and completed with HealOptions' defaults (the mode and epochs may stay None: the run decides
    them); refused without healing."""
    given = {name: plain(getattr(opts, f"heal_{name}")) for name in HEAL_FIELDS
             if getattr(opts, f"heal_{name}") is not None}
    if opts.heal is None and given:
        put("heal", True)
    if opts.heal is None:
        return
    FLAG.check("heal", opts.heal)
    if not opts.heal:
        if given:
            raise NumpruneError(f"heal_{next(iter(given))} is a healing option; it applies only with heal=True")
        return
    for name, value in asdict(HealOptions.checked(**given)).items():
        if name in HEAL_FIELDS:
            put(f"heal_{name}", value)


def read_recipe(path: str | Path) -> PruneOptions:
    """The recipe a JSON or YAML file (.yaml, .yml) holds: PruneOptions' fields, or a pruning_report.json (the options
    its run followed)."""
    path = Path(path).expanduser()
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except OSError as e:
        raise NumpruneError(f"cannot read the recipe {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NumpruneError(f"the recipe {path} is not {kind}: {reason}") from None
    if isinstance(data, dict) and isinstance(data.get("options"), dict):  # a pruning report
        data = data["options"]
    if not isinstance(data, dict):
        raise NumpruneError(f"the recipe {path} must hold a mapping of options, got {type(data).__name__}")
    return PruneOptions.checked(**data)


def recipe_of(recipe: PruneOptions | None, options: dict) -> PruneOptions:
    """The recipe a call gives: ``recipe``, changed by ``options`` (PruneOptions' fields), or ``options`` alone."""
    if recipe is None:
        return PruneOptions.checked(**options)
    if not isinstance(recipe, PruneOptions):
        raise NumpruneError(f"recipe must be a PruneOptions, got {type(recipe).__name__}")
    return recipe.replace(**options) if options else recipe


def option_types(method: str) -> tuple[dict, dict]:
    """``(prune options, score options)`` a ``method:key=value`` entry may set, each name with its declared type.

    Prune options are PruneOptions' fields; score options are the criterion's keyword-only
    parameters. Both come from the declarations, so a new option is parsed without a table.
    """
    hints = get_type_hints(PruneOptions)
    prune_options = {f.name: _declared(hints[f.name]) for f in fields(PruneOptions)
                     if f.name not in ("ratio", "method", "score_options")}
    criterion = get_method(method).criterion
    criterion_hints = get_type_hints(criterion)
    score_options = {n: _declared(criterion_hints[n]) for n in score_option_names(criterion)}
    return prune_options, score_options


def score_option_names(criterion) -> list[str]:
    """The options a criterion takes: its keyword-only parameters, in their declared order."""
    return [n for n, p in inspect.signature(criterion).parameters.items() if p.kind is p.KEYWORD_ONLY]


def keyword_defaults(criterion) -> dict:
    """The defaults of a criterion's keyword options."""
    return {n: p.default for n, p in inspect.signature(criterion).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


def _check_score_options(method: str, options) -> None:
    """The criterion's own options: names it takes, numbers that follow their rule."""
    accepted = score_option_names(get_method(method).criterion)
    for name, value in options.items():
        if name not in accepted:
            raise NumpruneError(f"method {method} takes no option {name!r}; it takes {', '.join(accepted) or 'none'}")
        if name in SCORE_OPTION_RULES:
            SCORE_OPTION_RULES[name].check(name, value)


def _declared(hint):
    """The type a hint declares, ``X | None`` read as X."""
    args = [t for t in get_args(hint) if t is not type(None)]
    return args[0] if args else hint


def _cast(kind: type, value: str):
    if kind is bool:
        if value.lower() not in BOOLEANS:
            raise ValueError(value)
        return BOOLEANS[value.lower()]
    return number_from_text(value, kind) if kind in (int, float) else kind(value)
