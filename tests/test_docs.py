"""Docs that stay true: the cheap commands the documentation shows are run, every command's help reads as
plain text, every flag and config key has the help text the generated reference pages are made of, and the
site is built (``mkdocs build --strict``) and opened in headless Chromium.

The search is the session's ``tiny_search_run`` (the documented quick search, shortened: 2 epochs on 256
images); the training of its cell is one epoch on 256 images. Screenshots of the site's home page and of
the search guide are copied to ``$BNAS_TEST_ARTIFACTS`` when that is set.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from bnas_nni.cli import build_parser, main
from bnas_nni.config import SCHEMAS
from bnas_nni.paths import REPO_ROOT

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cdp import find_chromium  # noqa: E402

EXPERIMENTS = REPO_ROOT / 'experiments'
#: reST that shows up verbatim in argparse output: double backticks and Sphinx roles
RST_MARKUP = re.compile(r'``|:(?:func|class|mod|meth|attr|data|exc|obj):`')


def _hook_module():
    """docs/hooks/reference.py, the mkdocs hook that writes the config and CLI reference pages."""
    if importlib.util.find_spec('mkdocs') is None:
        pytest.skip('mkdocs is not installed (pip install -e ".[docs]"; .ci/setup.sh installs it)')
    spec = importlib.util.spec_from_file_location('docs_reference_hook', REPO_ROOT / 'docs' / 'hooks' / 'reference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(parser: argparse.ArgumentParser, path: Tuple[str, ...] = ()) -> Iterator[Tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,)
                yield from _commands(sub, path + (name,))


def _run(argv: List[str]) -> Tuple[int, str]:
    """``bnas-nni ARGV`` in this process: exit status and everything printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as exc:                   # --help ends in SystemExit(0)
            rc = exc.code or 0
    return int(rc), out.getvalue()


# ----------------------------------------------------------------------------- help texts


def test_top_level_help_lists_every_command_in_plain_text():
    proc = subprocess.run(['bnas-nni', '--help'], capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'COLUMNS': '100'})
    assert proc.returncode == 0, proc.stderr
    assert not RST_MARKUP.search(proc.stdout), proc.stdout
    top = {path[0] for path in _commands(build_parser())}
    assert {'search', 'train', 'eval', 'export', 'plot', 'summary', 'nni', 'config'} <= top
    for name in top:
        assert re.search(rf'^\s+{re.escape(name)}\s', proc.stdout, re.M), f'{name} missing from bnas-nni --help'


def test_every_subcommand_help_is_plain_text():
    paths = list(_commands(build_parser()))
    assert len(paths) >= 12                 # the commands and the actions of data, nni and config
    for path in paths:
        rc, text = _run([*path, '--help'])
        assert rc == 0, (path, text)
        assert text.startswith('usage: bnas-nni ' + ' '.join(path)), text[:200]
        found = RST_MARKUP.search(text)
        assert not found, f'bnas-nni {" ".join(path)} --help shows reST markup {found.group(0)!r}:\n{text}'


def test_every_flag_and_config_key_has_help_and_reaches_the_reference_pages():
    hook = _hook_module()
    cli_page, config_page = hook.cli_reference(), hook.config_reference()
    root = build_parser()
    for path in _commands(root):
        parser = root
        for name in path:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert f'`bnas-nni {" ".join(path)}`' in cli_page
        for action in hook.documented_actions(parser):
            assert (action.help or '').strip(), f'bnas-nni {" ".join(path)} {action.option_strings or action.dest}'
            for flag in action.option_strings:
                assert f'`{flag}' in cli_page, flag
    for schema in SCHEMAS.values():
        for key in schema.keys():
            assert schema.help[key].strip(), f'{schema.name} key {key} has no help text'
            assert f'| `{key}` |' in config_page, key
    # help text reads as plain text in the Markdown tables: no HTML tag (runs/<name>), no emphasis (search_*.yaml)
    for row in (line for page in (config_page, cli_page) for line in page.splitlines() if line.startswith('| `')):
        prose = re.sub(r'`[^`]*`', '', row)
        assert not re.search(r'<[A-Za-z/]', prose), row
        assert not re.search(r'(?<!\\)\*', prose), row


def test_reference_hook_refuses_a_flag_without_help(monkeypatch):
    from mkdocs.exceptions import PluginError

    import bnas_nni.cli as cli

    hook = _hook_module()
    real = cli.build_parser

    def parser_with_a_bare_flag():
        parser = real()
        summary = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices['summary']
        summary.add_argument('--undocumented')
        return parser

    monkeypatch.setattr(cli, 'build_parser', parser_with_a_bare_flag)
    with pytest.raises(PluginError, match='summary --undocumented'):
        hook.cli_reference()


def test_api_page_docstrings_lose_their_rest_roles_and_grouped_parameters_split():
    spec = importlib.util.spec_from_file_location('docs_griffe_rst', REPO_ROOT / 'docs' / 'hooks' / 'griffe_rst.py')
    if importlib.util.find_spec('griffe') is None:
        pytest.skip('griffe is not installed (pip install -e ".[docs]")')
    rst = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rst)
    assert rst.markdown_from_rest('see :class:`~bnas_nni.space.BNASSpace` and :func:`run_guarded`') == \
        'see `BNASSpace` and `run_guarded`'
    doc = 'Intro.\n\nParameters\n----------\nlamda, tau\n    Diversity weight and decay.\nselect\n    Rule.\n'
    assert rst.split_grouped_parameters(doc) == ('Intro.\n\nParameters\n----------\nlamda\n    Diversity weight and '
                                                 'decay.\ntau\n    Diversity weight and decay.\nselect\n    Rule.')
    prose = 'Notes\n-----\na, b\n    stays as written.'
    assert rst.split_grouped_parameters(prose) == prose


# ----------------------------------------------------------------------------- documented commands


def test_summary_of_bnas_a_prints_the_official_parameter_count():
    rc, text = _run(['summary', 'bnas-a'])
    assert rc == 0, text
    assert re.search(r'parameters\s+5,578,252', text), text
    rc, text = _run(['summary', 'bnas-a', '--precision-rule', 'official-2020-11'])
    assert rc == 0, text
    assert re.search(r'binary MACs \(BOPs\)\s+6\.728e\+08', text), text
    assert re.search(r'full-precision MACs\s+1\.118e\+08', text), text


def test_plot_a_genotype_and_a_search_run(tiny_search_copy, tmp_path):
    svg = tmp_path / 'bnas_a.svg'
    rc, text = _run(['plot', 'latest_cell_zeroise', '--out', str(svg)])
    assert rc == 0, text
    assert svg.read_text().lstrip().startswith(('<?xml', '<svg')) and 'bin_dil_conv_3x3' in svg.read_text()
    run_dir = tiny_search_copy.run_dir
    rc, text = _run(['plot', str(run_dir)])
    assert rc == 0, text
    assert (run_dir / 'cell.png').stat().st_size > 1000
    heatmaps = sorted((run_dir / 'alphas').glob('epoch_*.png'))
    assert heatmaps and heatmaps[-1].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_quick_search_then_train_and_export_its_cell(tiny_search_run, tmp_path):
    # the search: what the guide says it prints and saves
    assert 'genotype (CIFAR):' in tiny_search_run.stdout and 'genotype (ImageNet, gamma=3):' in tiny_search_run.stdout
    genotype = tiny_search_run.out / 'tiny.yaml'
    assert genotype.is_file() and (tiny_search_run.out / 'tiny_imagenet.yaml').is_file()
    for name in ('config.yaml', 'metrics.csv', 'alpha_history.json'):
        assert (tiny_search_run.run_dir / name).is_file(), name
    # train the derived cell briefly, as the quick job does
    train_dir = tmp_path / 'train'
    rc, text = _run(['train', '--config', str(EXPERIMENTS / 'train_quick_fashion.yaml'), '--arch', str(genotype),
                     '--epochs', '1', '--set', 'train_subset=256', '--set', 'val_subset=256',
                     '--run-dir', str(train_dir)])
    assert rc == 0, text[-3000:]
    # deploy: the packed file, verified against the float model, then read back on every kernel path
    packed = tmp_path / 'quick.bnp'
    rc, text = _run(['export', '--checkpoint', str(train_dir), '--out', str(packed)])
    assert rc == 0, text[-3000:]
    verified = re.search(r'verified .*max \|logit difference\| vs the float model (\S+)', text)
    assert verified and float(verified.group(1)) <= 1e-4, text
    assert packed.stat().st_size > 1000
    rc, text = _run(['export', '--check', str(packed)])
    assert rc == 0, text[-3000:]


# ----------------------------------------------------------------------------- the site


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` of the repository's site into a temporary folder."""
    if importlib.util.find_spec('mkdocs') is None or importlib.util.find_spec('material') is None:
        pytest.skip('mkdocs-material is not installed (pip install -e ".[docs]"; .ci/setup.sh installs it)')
    out = tmp_path_factory.mktemp('site')
    proc = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_site_has_the_generated_references(site):
    config_html = (site / 'reference' / 'config' / 'index.html').read_text()
    cli_html = (site / 'reference' / 'cli' / 'index.html').read_text()
    for key in ('lamda', 'tau', 'gamma', 'recipe', 'precision_rule'):
        assert f'<code>{key}</code>' in config_html, key
    for flag in ('--resume', '--checkpoint', '--format', '--all-epochs'):
        assert f'<code>{flag}' in cli_html, flag
    api_html = (site / 'reference' / 'api' / 'index.html').read_text()
    assert 'BNASSpace' in api_html and 'register_strategy' in api_html


def test_site_in_a_browser(site, tmp_path):
    """The built site in headless Chromium, driven from a process of its own (tests/docs_browser.py):
    the home page and the search guide render (screenshots kept with the test artefacts), and the cell
    pictures and the web-UI screenshot load."""
    if find_chromium() is None:
        pytest.skip("chromium is not installed (bash .ci/setup.sh installs Debian's chromium)")
    env = {**os.environ, 'HOME': str(tmp_path / 'home')}
    proc = subprocess.run([sys.executable, str(HERE / 'docs_browser.py'), '--site', str(site), '--out',
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shots = [tmp_path / 'docs-home.png', tmp_path / 'docs-guide-search.png']
    for shot in shots:
        assert shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and shot.stat().st_size > 10_000
    artifacts = os.environ.get('BNAS_TEST_ARTIFACTS')
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(artifacts) / shot.name)
