"""The recipe: ``method:key=value`` strings parsed by the declared types, and one set of rules for the API and the
command line."""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import asdict

import pytest

from numprune.cli import args as a
from numprune.criteria import methods
from numprune.depth import DEFAULT_RIDGE
from numprune.errors import NumpruneError
from numprune.recipe import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE_INT, RATIO, SEED, PruneOptions


def test_an_entry_sets_prune_options_and_score_options_by_their_declared_types():
    opts = PruneOptions.parse("numerical:allocation=compensated-error:compensation=affine:compensation_damp=0.1:"
                              "centred=true:allocation_compensation=bias", ratio=0.3)
    expected = PruneOptions(ratio=0.3, method="numerical", allocation="compensated-error", compensation="affine",
                            compensation_damp=0.1, allocation_compensation="bias", score_options={"centred": True})
    assert opts == expected
    assert PruneOptions.parse("random:seed=3", ratio=0.2).score_options == {"seed": 3}
    for bad in ("numerical:seed=3", "numerical:centred=maybe", "numerical:compensation=ridge", "flap:centred=true",
                "numerical:iterations=0", "numerical:round_to=2.5", "numerical:allocation", "nope"):
        with pytest.raises(NumpruneError):
            PruneOptions.parse(bad, ratio=0.3)
    with pytest.raises(NumpruneError, match="ratio must be between"):
        PruneOptions.parse("numerical", ratio=1.0)


@pytest.mark.parametrize("name", list(methods()))
def test_every_keyword_option_of_every_criterion_parses_to_its_default(name):
    """The types come from the criterion's signature: its own defaults, written out, parse back to themselves."""
    defaults = {n: p.default for n, p in inspect.signature(methods()[name].criterion).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    entry = ":".join([name, *(f"{n}={v}" for n, v in defaults.items())])
    opts = PruneOptions.parse(entry, ratio=0.3)
    assert opts.score_options == defaults
    assert [type(v) for v in opts.score_options.values()] == [type(v) for v in defaults.values()]


# (rule, the command line's converter, the same bad value given to the API, as text to the parser)
SHARED_RULES = [
    (POSITIVE_INT, a.positive_int, dict(round_to=0), "0"),
    (NONNEGATIVE, a.nonnegative_float, dict(compensation_damp=-1.0), "-1"),
    (NONNEGATIVE, a.nonnegative_float, dict(score_options={"lambda_rel": -1.0}), "-1"),
    (SEED, a.seed, dict(method="random", score_options={"seed": 2**32}), str(2**32)),
    (RATIO, a.ratio, dict(ratio=1.5), "1.5"),
    (NONNEGATIVE, a.nonnegative_float, dict(depth=1, depth_ridge=-1.0), "-1"),
]


@pytest.mark.parametrize("rule,convert,options,text", SHARED_RULES)
def test_the_parser_and_the_api_refuse_a_value_by_the_same_rule(rule, convert, options, text):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"must be {rule.says}")):
        convert(text)
    options = {"ratio": 0.3, **options}
    with pytest.raises(NumpruneError, match=re.escape(f"must be {rule.says}")):
        PruneOptions.checked(**options)


def test_unknown_options_are_named():
    with pytest.raises(NumpruneError, match="unknown option 'ratoi'"):
        PruneOptions.checked(0.3, ratoi=0.3)


@pytest.mark.parametrize("options", [dict(method="numerical"), dict(method="numerical-robust"),
                                     dict(method="flap", allocation="compensated-error"),
                                     dict(method="numerical", allocation="compensated-error",
                                          allocation_compensation="affine")])
def test_resolved_options_resolve_to_themselves(options):
    """compare passes each cell's resolved options back to prune: resolving them again changes and refuses nothing;
    only the compensated-error allocation records a guiding compensation."""
    opts = PruneOptions.checked(0.3, **options)
    again = PruneOptions.checked(0.3, **{k: v for k, v in asdict(opts).items() if k != "ratio"})
    assert again == opts
    assert (opts.allocation_compensation is None) == (opts.allocation != "compensated-error")


def test_depth_is_part_of_the_recipe():
    """Depth alone is ratio 0 (the width options then resolve to none); a report's options read back to the same
    recipe; the width step's recipe is the same without its depth options."""
    alone = PruneOptions.checked(depth=2)
    assert (alone.ratio, alone.depth, alone.depth_selection, alone.depth_ridge) == (0.0, 2, "patched", DEFAULT_RIDGE)
    assert (alone.allocation, alone.compensation, alone.score_options) == ("none", "none", {})
    assert alone == PruneOptions(ratio=0, depth=2) == PruneOptions.checked(**asdict(alone))
    assert alone.requested() == {"ratio": 0.0, "depth": 2}
    assert alone.replace(ratio=0.2) == PruneOptions(ratio=0.2, depth=2)
    both = PruneOptions.parse("numerical:depth=2:depth_selection=shortgpt:depth_ridge=0.5", ratio=0.3)
    assert both == PruneOptions(ratio=0.3, method="numerical", depth=2, depth_selection="shortgpt", depth_ridge=0.5)
    assert both == PruneOptions.checked(**asdict(both))
    assert both.width_step() == PruneOptions(ratio=0.3, method="numerical", heal=False)  # depth runs do not heal
    width = PruneOptions(ratio=0.3)
    assert (width.depth, width.depth_selection, width.depth_ridge) == (0, None, None)


@pytest.mark.parametrize("options,message", [
    (dict(ratio=0.3, depth=-1), f"depth must be {NONNEGATIVE_INT.says}, got -1"),
    (dict(ratio=0.3, depth=True), f"depth must be {NONNEGATIVE_INT.says}, got True"),
    (dict(ratio=0.3, depth=1.5), f"depth must be {NONNEGATIVE_INT.says}, got 1.5"),
    (dict(ratio=0.3, depth_ridge=0.1), "depth_ridge is a depth option; it applies only with depth > 0"),
    (dict(ratio=0.3, depth=0, depth_selection="patched"), "depth_selection is a depth option"),
    (dict(ratio=0.3, depth=1, depth_selection="cosine"), "unknown depth selection 'cosine'"),
    (dict(ratio=0, depth=1, method="flap"), "method applies to width pruning, which a ratio of 0 skips"),
    (dict(ratio=0, depth=1, allocation="uniform"), "allocation applies to width pruning"),
    (dict(ratio=0, depth=1, score_options={"damp": 0.1}), "score_options applies to width pruning"),
    (dict(ratio=0, depth=1, heal=True), "heal applies to width pruning"),
    (dict(ratio=0.3, depth=1, heal=True), "healing after depth pruning is not supported"),
    (dict(ratio=0), "ratio must be between 0 and 1 (exclusive), got 0"),
])
def test_bad_depth_options_are_one_line(options, message):
    with pytest.raises(NumpruneError, match=re.escape(message)):
        PruneOptions.checked(**options)
