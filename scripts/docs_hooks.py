"""mkdocs hook: the command reference page, rendered at build time from numprune's own argparse parser.

``docs/commands.md`` holds the marker ``<!-- commands -->``; every build replaces it with each
subcommand's usage line and a table of its options (flags, default, help) exactly as the parser
has them, so the page changes whenever a flag or its help does and cannot drift from the code.
"""

from __future__ import annotations

import argparse
import html

MARKER = "<!-- commands -->"
PAGE = "commands.md"


def on_page_markdown(markdown: str, page, **_) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    from numprune.cli import parser  # imported when the page is built, so the page shows the code being built

    return markdown.replace(MARKER, command_reference(parser()))


def command_reference(root: argparse.ArgumentParser) -> str:
    """Markdown for every subcommand of ``root``: a heading, its one-line help, usage, and its options by group."""
    subparsers = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in subparsers._choices_actions}
    sections = [_global_options(root)]
    for name, command in subparsers.choices.items():
        sections.append(f"## numprune {name}\n\n{html.escape(summaries.get(name) or '', quote=False)}\n\n"
                        f"```text\n{command.format_usage().strip()}\n```\n")
        for group in command._action_groups:
            actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
            if not actions:
                continue
            if group.title not in ("options", "positional arguments", "optional arguments"):
                sections.append(f"**{group.title}**" + (f": {html.escape(group.description, quote=False)}"
                                                        if group.description else "") + "\n")
            sections.append(_options_table(command, actions))
    return "\n".join(sections)


def _global_options(root: argparse.ArgumentParser) -> str:
    return f"## numprune\n\n```text\n{root.format_usage().strip()}\n```\n\n" + _options_table(
        root, [a for a in root._actions if a.option_strings])


def _options_table(command: argparse.ArgumentParser, actions: list[argparse.Action]) -> str:
    """An HTML table, so that help text appears verbatim (no markdown reading of ``*``, ``_`` or ``|`` in it)."""
    formatter = command._get_formatter()
    rows = []
    for action in actions:
        flags = formatter._format_action_invocation(action)
        default = "" if action.default in (None, False, argparse.SUPPRESS) or action.required else action.default
        required = " (required)" if action.required else ""
        rows.append(f"<tr><td><code>{html.escape(flags)}</code>{required}</td>"
                    f"<td>{html.escape(_text(default), quote=False)}</td>"
                    f"<td>{html.escape(formatter._expand_help(action) if action.help else '', quote=False)}</td></tr>")
    return "\n".join(["<table>", "<thead><tr><th>option</th><th>default</th><th>what it does</th></tr></thead>",
                      "<tbody>", *rows, "</tbody>", "</table>", ""])


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(getattr(value, "__name__", value)).removeprefix("torch.")
