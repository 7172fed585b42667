"""mkdocs hook: the configuration and command-line reference pages, generated at build time.

Each config key is declared once in ``bnas_nni/config.py`` (``knob(default, help)``) and each flag once in
the ``register(subparsers)`` function of its command module; these pages are written from those
declarations on every build (``reference/config.md``, ``reference/cli.md``), so they cannot drift from
the code. A key or a flag without help text stops the build.
"""
from __future__ import annotations

import argparse
import html
import os
import re
from typing import Iterator, List, Tuple

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

CONFIG_PAGE = 'reference/config.md'
CLI_PAGE = 'reference/cli.md'
#: usage lines are wrapped by argparse at the terminal width: fix it, so every build writes the same page
USAGE_WIDTH = '78'


def _escape(text: str) -> str:
    """Markdown table cell text as plain text: outside `code spans` HTML-escaped (``runs/<name>`` would be a
    tag) and Markdown's emphasis and link characters escaped (``search_*.yaml``); ``|`` escaped everywhere."""
    parts = re.split(r'(`[^`]*`)', text.replace('\\|', '|'))
    out = ''.join(p if p.startswith('`') else re.sub(r'([\\*_\[\]])', r'\\\1', html.escape(p, quote=False))
                  for p in parts)
    return out.replace('|', '\\|')


def config_reference() -> str:
    from bnas_nni.config import SCHEMAS

    lines = ['# Configuration reference', '',
             'Every key of `bnas-nni search` and `bnas-nni train` (which `eval` and `export` share), generated '
             'from the declarations in `bnas_nni/config.py` when this site is built. The same text is printed by '
             '`bnas-nni config search` and `bnas-nni config train`.', '',
             'A config is resolved once, later layers winning: section defaults, command defaults, recipe '
             'defaults (training), the YAML file (`--config`), flags and `--set KEY=VALUE`, NNI trial parameters. '
             '`--set KEY=null` restores a default; unknown keys are refused with the list of allowed ones.', '']
    for name, schema in SCHEMAS.items():
        missing = [k for k in schema.keys() if not schema.help[k].strip()]
        if missing:
            raise PluginError(f'config keys of {name} without help text: {", ".join(missing)} '
                              '(declare them with knob(default, help) in bnas_nni/config.py)')
        for line in schema.reference().splitlines():
            if line.startswith('#'):
                line = '#' + line                       # the schema's title becomes a section of this page
            elif line.startswith('| `'):
                cells = [cell.strip() for cell in line.strip().strip('|').split(' | ')]
                line = '| ' + ' | '.join([cells[0], _escape(cells[1]), cells[2], _escape(' | '.join(cells[3:]))]) + ' |'
            lines.append(line)
        lines.append('')
    return '\n'.join(lines)


Command = Tuple[Tuple[str, ...], argparse.ArgumentParser, str]


def _commands(parser: argparse.ArgumentParser, path: Tuple[str, ...]) -> Iterator[Command]:
    """Every (sub)command parser under ``parser`` with its path and the help line its parent gives it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), sub, helps.get(name) or ''
                yield from _commands(sub, path + (name,))


def documented_actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The arguments a user can give a parser (not -h/--version, not the subcommand slot)."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                                             argparse._SubParsersAction))]


def _argument_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    name = ', '.join(action.option_strings) if action.option_strings else (action.metavar or action.dest)
    if action.option_strings and action.nargs != 0:
        name += f' {action.metavar or action.dest.upper()}'
    text = parser._get_formatter()._expand_help(action)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        text += ' (one of: ' + ', '.join(str(c) for c in action.choices) + ')'
    if action.default not in (None, False, argparse.SUPPRESS) and '%(default)' not in (action.help or '') \
            and action.option_strings:
        text += f' (default: `{action.default}`)'
    return f'| `{name}` | {_escape(" ".join(text.split()))} |'


def cli_reference() -> str:
    from bnas_nni.cli import build_parser

    previous = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = USAGE_WIDTH
    try:
        root = build_parser()
        lines = ['# Command-line reference', '',
                 'Every command and flag of `bnas-nni`, generated from its argparse parser '
                 '(`bnas_nni/cli.py` and the `register()` function beside each command) when this site is built. '
                 'The same text is printed by `bnas-nni COMMAND --help`. Flags named after config keys take '
                 'their help from the [configuration reference](config.md); `--set KEY=VALUE` reaches every '
                 'other key.', '',
                 '```text', root.format_usage().strip(), '```', '', root.description or '', '']
        missing = []
        for path, parser, summary in _commands(root, ('bnas-nni',)):
            if not summary.strip():
                missing.append(' '.join(path))
            depth = '#' * min(len(path), 4)
            lines += [f'{depth} `{" ".join(path)}`', '', _escape(parser.description or summary), '',
                      '```text', parser.format_usage().strip(), '```', '']
            actions = documented_actions(parser)
            for action in actions:
                if not (action.help or '').strip() or action.help == argparse.SUPPRESS:
                    if action.help != argparse.SUPPRESS:
                        missing.append(f'{" ".join(path)} {"/".join(action.option_strings) or action.dest}')
            shown = [a for a in actions if (a.help or '').strip() and a.help != argparse.SUPPRESS]
            if shown:
                lines += ['| argument | meaning |', '|---|---|'] + [_argument_row(parser, a) for a in shown] + ['']
        if missing:
            raise PluginError('command-line arguments without help text: ' + '; '.join(missing))
        return '\n'.join(lines)
    finally:
        if previous is None:
            os.environ.pop('COLUMNS', None)
        else:
            os.environ['COLUMNS'] = previous


def on_files(files: Files, config) -> Files:
    for page, text in ((CONFIG_PAGE, config_reference()), (CLI_PAGE, cli_reference())):
        files.append(File.generated(config, page, content=text))
    return files
