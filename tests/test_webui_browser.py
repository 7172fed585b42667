"""The NNI web UI in a real browser: two tiny Fashion-MNIST training trials, loaded in headless Chromium.

``tests/webui_driver.py`` starts the experiment with ``bnas-nni nni create`` and drives Chromium over
the DevTools protocol, inside a private network namespace where one is available (otherwise on
127.0.0.1, the manager bound there by the loopback preload). This test asserts that what the
rendered pages show is what the trials reported: one table row per trial with its status and final
value, and a chart tooltip for every intermediate value. The screenshots stay in the test's tmp
folder and are copied to ``$BNAS_TEST_ARTIFACTS`` when that is set.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnas_nni.integrations.nni.loopback import loopback_namespace_prefix
from bnas_nni.integrations.nni.processes import pid_alive, terminate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cdp import find_chromium  # noqa: E402
from harness import kill_tree  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(660)]

EPOCHS = 2


def _decode(data: str):
    value = json.loads(data)
    return json.loads(value) if isinstance(value, str) else value


def _numbers(text: str):
    return [float(x) for x in re.findall(r'-?\d+(?:\.\d+)?(?:e-?\d+)?', text)]


def _stop_leftovers(workdir: Path) -> None:
    """Chromium and the NNI manager run in process groups of their own: stop any still alive by PID."""
    pids = [int(x) for x in (workdir / 'pids').read_text().split()] if (workdir / 'pids').is_file() else []
    manifest = workdir / 'scratch' / 'home' / 'nni-experiments' / '.experiment'
    if manifest.is_file():
        pids += [int(e['pid']) for e in json.loads(manifest.read_text()).values() if e.get('pid')]
    for pid in pids:
        terminate(pid, grace=5, group=True)             # each is the leader of its own group


@pytest.fixture(scope='module')
def webui(tmp_path_factory):
    """Run the driver once; yield its result.json (and copy the screenshots out)."""
    if find_chromium() is None:
        pytest.skip('chromium is not installed (bash .ci/setup.sh installs Debian\'s chromium)')
    from bnas_nni.data import fashion_mnist_root
    from bnas_nni.errors import DatasetError

    try:
        fashion_mnist_root()
    except DatasetError as exc:
        pytest.skip(str(exc))
    workdir = tmp_path_factory.mktemp('webui')
    prefix = loopback_namespace_prefix()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get('PYTHONPATH')])))
    proc = subprocess.Popen([*prefix, sys.executable, str(HERE / 'webui_driver.py'), '--workdir', str(workdir),
                             '--epochs', str(EPOCHS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)                             # the driver's group and tree: its bnas-nni and nnictl children
        output, _ = proc.communicate()
    finally:
        _stop_leftovers(workdir)
    result_file = workdir / 'result.json'
    assert result_file.is_file(), f'driver wrote no result (rc {proc.returncode}):\n{output[-4000:]}'
    result = json.loads(result_file.read_text())
    result['namespace'] = bool(prefix)
    artifacts = os.environ.get('BNAS_TEST_ARTIFACTS')
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        for shot in result.get('screenshots', []):
            shutil.copy(shot, Path(artifacts) / Path(shot).name)
    assert 'error' not in result, f'{result.get("traceback", result["error"])}\n{result.get("create_stdout", "")}' \
                                  f'\n{result.get("create_stderr", "")}\n{output[-3000:]}'
    yield result


def test_nni_create_waited_for_both_trials(webui):
    assert webui['create_rc'] == 0, webui['create_stderr']
    out = webui['create_stdout']
    assert f'NNI experiment {webui["experiment_id"]} is running: http://127.0.0.1:{webui["port"]}' in out
    assert out.count(' SUCCEEDED') == 2 and 'DONE' in out, out
    trials = webui['trials']
    assert len(trials) == 2 and {t['status'] for t in trials} == {'SUCCEEDED'}


def test_table_rows_show_status_and_final_value(webui):
    rows = webui['detail_rows']
    assert len(rows) == 2, rows
    for trial in webui['trials']:
        row = next(r for r in rows if trial['trialJobId'] in r)
        assert 'SUCCEEDED' in row
        final = _decode(trial['finalMetricData'][0]['data'])['default']
        shown = re.search(r'(-?\d+(?:\.\d+)?) \(FINAL\)', row)
        assert shown, row
        assert float(shown.group(1)) == pytest.approx(final, abs=1e-6), (row, final)


def test_intermediate_chart_shows_every_reported_value(webui):
    reported = {}
    for m in webui['metrics']:
        if m['type'] == 'PERIODICAL':
            reported.setdefault(m['trialJobId'], []).append((m['sequence'], _decode(m['data'])['default']))
    assert sorted(len(v) for v in reported.values()) == [EPOCHS, EPOCHS]
    tips = webui['tooltips']
    assert len(tips) == 2 * EPOCHS
    for trial, values in reported.items():
        for seq, value in sorted(values):
            tip = next(t for t in tips if t['trial'] == trial and t['index'] == seq)
            assert f'Trial ID: {trial}' in tip['text'], tip
            shown = re.search(r'Intermediate: (\S+)', tip['text'])
            assert shown and float(shown.group(1)) == pytest.approx(value, abs=1e-6), (tip, value)
    assert sum(t['via'] == 'mouse' for t in tips) >= EPOCHS     # most points answer a real mouse hover


def test_overview_and_screenshots(webui):
    text = webui['oview_text']
    assert 'DONE' in text and webui['experiment_id'] in text
    best = max(_decode(t['finalMetricData'][0]['data'])['default'] for t in webui['trials'])
    assert any(n == pytest.approx(best, abs=1e-6) for n in _numbers(text)), (best, text[:2000])
    from PIL import Image

    assert len(webui['screenshots']) == 3
    for shot in webui['screenshots']:
        with Image.open(shot) as img:
            assert img.size == (1440, 1000)
            assert len(set(img.convert('L').resize((64, 40)).getdata())) > 10     # a page, not a blank frame


def test_everything_stopped(webui):
    assert webui['stop_rc'] == 0 and 'stopped' in webui['stop_stdout']
    assert not webui['manager_alive_after_stop']
    assert not pid_alive(webui['chromium_pid']) and webui['chromium_exit'] is not None
