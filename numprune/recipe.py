"""The recipe of a pruning run (method, allocation, compensation, statistics, options), checked in one place.

``PruneOptions`` holds it; ``resolve`` fills in the method's defaults and checks every option,
whether it came from Python, from the command line or from a ``method:key=value`` string
(``PruneOptions.parse``, which casts each value to its declared type: a PruneOptions field's or a
keyword-only parameter of the method's criterion). The rules a number must follow (``Rule``) are
stated here once; the command line's argument converters are built from the same rules.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import get_args, get_type_hints

import torch

from numprune import compensate
from numprune.allocate import ALLOCATIONS, AUTO, GQA_UNITS, blend_schedule
from numprune.criteria import get_method
from numprune.errors import NumpruneError

COMPENSATION_STATS = ("dense", "sequential")
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
SEED = Rule(int, lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer between 0 and {MAX_SEED}")
NONNEGATIVE = Rule(float, lambda v: is_number(v) and 0 <= v < math.inf, "a finite number >= 0")
RATIO = Rule(float, lambda v: is_number(v) and 0.0 < v < 1.0, "between 0 and 1 (exclusive)")
SHARE = Rule(float, lambda v: is_number(v) and 0.0 <= v <= 1.0, "between 0 and 1")
FLAG = Rule(bool, lambda v: isinstance(v, bool), "True or False")
# The criteria's keyword options that are numbers, by name (every criterion that takes one means the same by it).
SCORE_OPTION_RULES = {"iterations": POSITIVE_INT, "damp": NONNEGATIVE, "lambda_rel": NONNEGATIVE, "seed": SEED}


@dataclass
class PruneOptions:
    """Everything that decides a pruning run's result (recorded verbatim in the report)."""

    ratio: float
    method: str = "numerical"
    allocation: str | None = None  # None: the method's own (see criteria.methods)
    gqa_unit: str = "query"
    round_to: int = 1
    compensation: str | None = None  # None: the method's own
    compensation_stats: str = "dense"
    compensation_damp: float | None = None  # None: the method's own with its compensation, else 0.01
    allocation_compensation: str | None = None  # compensated-error: whose error curves guide it (None: the run's own)
    blend_weight: float | None = None  # blend: the share of the global ranking's widths (None: the ratio's schedule)
    score_options: dict = field(default_factory=dict)

    @classmethod
    def checked(cls, ratio: float, **options) -> PruneOptions:
        """Resolved options from keyword arguments (the fields); an unknown name is refused."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)} - {"ratio"})
        if unknown:
            raise NumpruneError(f"unknown option {unknown[0]!r}; the options are "
                                f"{', '.join(f.name for f in fields(cls) if f.name != 'ratio')}")
        opts = cls(ratio=ratio, **options)
        opts.resolve()
        return opts

    @classmethod
    def parse(cls, entry: str, ratio: float) -> PruneOptions:
        """Resolved options from ``name:key=value:...``, every value cast to its declared type."""
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

    def resolve(self) -> None:
        """Check every option and fill in the method's defaults."""
        for name in ("method", "allocation", "gqa_unit", "compensation", "compensation_stats", "allocation_compensation"):
            value = getattr(self, name)
            if not isinstance(value, str) and (value is not None or name == "method"):  # None: the method's own
                raise NumpruneError(f"{name} must be a name, got {value!r}")
        if not isinstance(self.score_options, dict):
            raise NumpruneError(f"score options must be a dict, got {self.score_options!r}")
        for name in ("ratio", "round_to", "compensation_damp", "blend_weight"):
            setattr(self, name, plain(getattr(self, name)))
        self.score_options = {name: plain(value) for name, value in self.score_options.items()}
        if not is_number(self.ratio):
            raise NumpruneError(f"ratio must be a number, got {self.ratio!r}")
        RATIO.check("ratio", self.ratio)
        method = get_method(self.method)
        self.allocation = self.allocation or method.allocation
        own_compensation = self.compensation in (None, method.compensation)
        self.compensation = self.compensation or method.compensation
        if self.compensation not in compensate.REGISTRY:
            raise NumpruneError(f"unknown compensation {self.compensation!r}; choose from "
                                f"{', '.join(compensate.COMPENSATIONS)}")
        if self.allocation == GUIDED_BY_COMPENSATION:  # the one allocation a compensation guides (None for the others)
            self.allocation_compensation = self.allocation_compensation or self.compensation
            if self.allocation_compensation not in compensate.REGISTRY:
                raise NumpruneError(f"unknown compensation {self.allocation_compensation!r} for the allocation; "
                                    f"choose from {', '.join(compensate.COMPENSATIONS)}")
        elif self.allocation_compensation is not None:
            raise NumpruneError(f"an allocation compensation guides the {GUIDED_BY_COMPENSATION} allocation only, "
                                f"not {self.allocation}")
        if self.compensation_damp is None:  # the method's own damping goes with its own compensation
            self.compensation_damp = (method.compensation_damp if own_compensation
                                      else compensate.Damped.compensation_damp)
        self.score_options = {**method.score_options, **self.score_options}
        for value, allowed, what in ((self.allocation, (*ALLOCATIONS, AUTO), "allocation"),
                                     (self.gqa_unit, GQA_UNITS, "GQA unit"),
                                     (self.compensation_stats, COMPENSATION_STATS, "compensation statistics")):
            if value not in allowed:
                raise NumpruneError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        NONNEGATIVE.check("compensation damping", self.compensation_damp)
        if self.allocation == "blend":
            self.blend_weight = blend_schedule(self.ratio) if self.blend_weight is None else self.blend_weight
            SHARE.check("blend weight", self.blend_weight)
        elif self.blend_weight is not None:  # auto chooses the weight itself
            raise NumpruneError(f"a blend weight applies to the blend allocation only, not to {self.allocation}")
        if self.allocation == AUTO and self.compensation_stats == "sequential":
            raise NumpruneError("the auto allocation compensates every candidate from the one calibration's dense "
                                "statistics; sequential statistics would calibrate again for each")
        POSITIVE_INT.check("round_to", self.round_to)
        _check_score_options(self.method, self.score_options)

    def compensation_options(self, name: str | None = None):
        """The resolved options of compensation ``name`` (default: the run's), as its registry entry declares them."""
        options = compensate.REGISTRY[name or self.compensation].options
        return options(**{f.name: getattr(self, f.name) for f in fields(options)})


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
