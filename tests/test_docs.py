"""The documentation site builds with ``mkdocs build --strict`` (no broken link, anchor or page), and its
command reference is the parser's: every option's current help text is on the page."""

import argparse
import html
import importlib.util
import os
import subprocess
import sys

import pytest
from hostile import REPO

from numprune.cli import parser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p),
           "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def helps(root: argparse.ArgumentParser):
    """(command, flag, help as argparse prints it) for every option of every subcommand."""
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                yield name, action.option_strings, formatter._expand_help(action)


def test_site_builds_strictly_with_every_page(site):
    pages = {p.parent.name for p in site.glob("*/index.html")}
    assert {"getting-started", "commands", "python-api", "method", "results", "deployment", "large-models",
            "refusals", "architecture", "development"} <= pages
    api = (site / "python-api" / "index.html").read_text()
    assert "Prune <code>model</code> and return the narrower model and its report" in api  # numprune.prune's docstring


def test_command_reference_holds_the_parsers_current_help(site):
    page = (site / "commands" / "index.html").read_text()
    found = list(helps(parser()))
    assert len(found) > 100
    missing = [(name, flags) for name, flags, text in found if html.escape(text, quote=False) not in page]
    assert not missing


def test_a_changed_help_changes_the_reference():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "scripts" / "docs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    root = parser()
    prune = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    ratio = next(a for a in prune._actions if "--ratio" in a.option_strings)
    before = hooks.command_reference(root)
    assert html.escape(ratio.help, quote=False) in before
    assert "a help text that no flag has" not in before
    ratio.help = "a help text that no flag has"
    assert "a help text that no flag has" in hooks.command_reference(root)
