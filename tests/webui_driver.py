"""Driver of the web-UI browser test (run by ``tests/test_webui_browser.py``, possibly inside a private
network namespace, so the NNI manager, the trials and Chromium all live on a loopback nobody else sees).

1. ``bnas-nni nni create --wait`` on a shrunken ``experiments/nnictl_train_fashion.yml`` (two tiny
   Fashion-MNIST trainings);
2. headless Chromium loads ``/detail`` and ``/oview``; the trial table rows are read from the rendered
   page, and every point of the "Intermediate result" chart is hovered with a real mouse event to
   read the tooltip the page shows for it;
3. screenshots of both pages; the REST view of the same experiment for comparison;
4. everything stopped by PID (``bnas-nni nni stop``, then the manager's PID from NNI's manifest,
   and Chromium's process group), also on failure.

Writes ``<workdir>/result.json``; the test asserts on it. The PIDs of what it starts are in
``<workdir>/pids`` (Chromium) and NNI's manifest under ``<workdir>/scratch/home`` (the manager), so
the test can stop them by PID even if this driver itself had to be killed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from cdp import Chromium  # noqa: E402

from bnas_nni.integrations.nni.environment import experiment_environment  # noqa: E402
from bnas_nni.integrations.nni.lifecycle import stop_experiment  # noqa: E402
from bnas_nni.integrations.nni.nnictl import manifest_entry  # noqa: E402
from bnas_nni.integrations.nni.processes import pid_alive  # noqa: E402
from bnas_nni.integrations.nni.rest import free_port, rest_get  # noqa: E402

# the echarts instance behind a chart element (echarts-for-react keeps it on its React component)
_CHART = r'''
const el = document.querySelector('[_echarts_instance_]');
const key = el && Object.keys(el).find(k => k.startsWith('__reactFiber$'));
let fiber = key ? el[key] : null, chart = null;
while (fiber && !chart) {
  if (fiber.stateNode && fiber.stateNode.getEchartsInstance) chart = fiber.stateNode.getEchartsInstance();
  fiber = fiber.return;
}
'''
CHART_POINTS = '(() => {' + _CHART + r'''
  if (!chart) return null;
  const box = el.getBoundingClientRect(), points = [];
  (chart.getOption().series || []).forEach((s, si) => (s.data || []).forEach((v, di) => {
    const [x, y] = chart.convertToPixel({seriesIndex: si}, [di, v]);
    points.push({trial: s.name, series: si, index: di, value: v, x: box.left + x, y: box.top + y});
  }));
  return points;
})()'''
TOOLTIP = 'Array.from(document.querySelectorAll(".tooldetailAccuracy")).map(e => e.innerText).join("\\n")'
TABLE_ROWS = 'Array.from(document.querySelectorAll(".ms-DetailsRow")).map(r => r.innerText)'


def _show_tip(series: int, index: int) -> str:
    action = f'{{type: "showTip", seriesIndex: {series}, dataIndex: {index}}}'
    return '(() => {' + _CHART + f'chart.dispatchAction({action}); return 1;}})()'


def _tooltip_for(text: str, point: dict) -> bool:
    """Is ``text`` the tooltip of ``point`` (its trial, and the value the chart holds for it)?"""
    import re

    shown = re.search(r'Intermediate: (\S+)', text)
    return f'Trial ID: {point["trial"]}' in text and bool(shown) and _same(shown.group(1), point['value'])


def _same(shown: str, value: float) -> bool:
    try:
        return abs(float(shown) - float(value)) <= 1e-9 * max(1.0, abs(float(value)))
    except ValueError:
        return False


def _wait_tooltip(browser: Chromium, point: dict, timeout: float = 2.0) -> str:
    deadline = time.monotonic() + timeout
    text = ''
    while time.monotonic() < deadline:
        text = browser.evaluate(TOOLTIP) or ''
        if _tooltip_for(text, point):
            break
        time.sleep(0.1)
    return text


def _hover(browser: Chromium, point: dict) -> str:
    """Move the mouse away (hiding any tooltip), then onto ``point``; the tooltip text shown then."""
    browser.call('Input.dispatchMouseEvent', type='mouseMoved', x=5, y=5)
    browser.evaluate('(() => {' + _CHART + 'chart && chart.dispatchAction({type: "hideTip"}); return 1;})()')
    time.sleep(0.2)
    browser.call('Input.dispatchMouseEvent', type='mouseMoved', x=point['x'], y=point['y'])
    return _wait_tooltip(browser, point)


def _click_pivot(title: str) -> str:
    # clicked from a timer so that Runtime.evaluate returns before React re-renders
    return ('setTimeout(() => Array.from(document.querySelectorAll(".ms-Pivot-link"))'
            f'.find(e => e.innerText.includes({json.dumps(title)})).click(), 0); 1')


def experiment_yaml(workdir: Path, epochs: int) -> Path:
    """The shipped Fashion-MNIST training experiment, shrunk to two tiny trials."""
    exp = yaml.safe_load((REPO / 'experiments' / 'nnictl_train_fashion.yml').read_text())
    assert exp['trainingService']['platform'] == 'local' and exp.get('trialGpuNumber', 0) == 0, exp
    assert exp['trialCommand'].startswith('python trainers/train_cifar10.py'), exp['trialCommand']
    exp.update(
        trialCommand=(f'{exp["trialCommand"]} --epochs {epochs} --train-subset 256 --val-subset 128 --batch-size 64 '
                      '--init-channels 4 --layers 3 --threads 1 --set tensorboard=false'),
        trialCodeDirectory=str(REPO), experimentWorkingDirectory=str(workdir / 'experiments'),
        maxTrialNumber=2, maxExperimentDuration='8m',
        searchSpace={'lr': {'_type': 'choice', '_value': [0.02, 0.05]}})
    path = workdir / 'exp.yml'
    path.write_text(yaml.safe_dump(exp))
    return path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument('--workdir', required=True)
    p.add_argument('--epochs', type=int, default=2)
    args = p.parse_args()
    workdir = Path(args.workdir).resolve()
    scratch = workdir / 'scratch'
    result: dict = {'pid': os.getpid(), 'screenshots': []}
    env = experiment_environment(scratch, threads=1)
    exp_id = None
    browser = None
    try:
        config = experiment_yaml(workdir, args.epochs)
        port = free_port()
        result['port'] = port
        cli = [sys.executable, '-m', 'bnas_nni.cli', 'nni']
        t0 = time.monotonic()
        created = subprocess.run([*cli, 'create', str(config), '--port', str(port), '--scratch', str(scratch),
                                  '--wait', '--wait-timeout', '400'], capture_output=True, text=True, timeout=480)
        result.update(create_rc=created.returncode, create_stdout=created.stdout, create_stderr=created.stderr[-3000:],
                      experiment_seconds=round(time.monotonic() - t0, 1))
        exp_id = next((w for line in created.stdout.splitlines() if line.startswith('NNI experiment ')
                       for w in line.split()[2:3]), None)
        result['experiment_id'] = exp_id
        if created.returncode != 0 or exp_id is None:
            raise RuntimeError(f'bnas-nni nni create failed (rc {created.returncode})')
        result['trials'] = rest_get(port, 'trial-jobs')
        result['metrics'] = rest_get(port, 'metric-data')

        browser = Chromium(workdir / 'chromium-profile', width=1440, height=1000)
        result['chromium_pid'] = browser.proc.pid
        with open(workdir / 'pids', 'a') as f:         # for the test to stop it should this driver be killed
            f.write(f'{browser.proc.pid}\n')
        url = f'http://127.0.0.1:{port}'
        # trials detail: the table, then the intermediate-result chart
        browser.navigate(f'{url}/detail')
        want = [t['trialJobId'] for t in result['trials']]
        browser.wait_for(f'(() => {{ const t = document.body.innerText; '
                         f'return {json.dumps(want)}.every(i => t.includes(i))'
                         ' && !t.includes("RUNNING") && !t.includes("WAITING"); })()', timeout=60)
        result['detail_rows'] = browser.evaluate(TABLE_ROWS)
        result['detail_text'] = browser.text()
        result['screenshots'].append(str(browser.screenshot(workdir / 'webui-detail.png')))
        browser.evaluate(_click_pivot('Intermediate result'))
        periodical = sum(m['type'] == 'PERIODICAL' for m in result['metrics'])
        points = browser.wait_for(f'(() => {{ const p = {CHART_POINTS}; '
                                  f'return p && p.length >= {periodical} ? p : null; }})()', timeout=30)
        tooltips = []
        for point in points:
            # a real hover first; where another trial's point lies on top, ask the chart for this one's tooltip
            text = _hover(browser, point)
            via = 'mouse'
            if not _tooltip_for(text, point):
                browser.evaluate(_show_tip(point['series'], point['index']))
                text, via = _wait_tooltip(browser, point), 'showTip'
            tooltips.append({**point, 'text': text, 'via': via})
        result['tooltips'] = tooltips
        result['screenshots'].append(str(browser.screenshot(workdir / 'webui-intermediate.png')))
        browser.navigate(f'{url}/oview')
        browser.wait_for('document.body.innerText.includes("DONE") || document.body.innerText.includes("Succeeded")',
                         timeout=60)
        time.sleep(1)
        result['oview_text'] = browser.text()
        result['screenshots'].append(str(browser.screenshot(workdir / 'webui-overview.png')))
    except Exception as exc:  # noqa: BLE001 - reported to the test through result.json
        result['error'] = f'{type(exc).__name__}: {exc}'
        result['traceback'] = traceback.format_exc()
    finally:
        if browser is not None:
            browser.close()
            result['chromium_exit'] = browser.proc.returncode
        if exp_id is not None:
            pid = manifest_entry(env, exp_id).get('pid')
            stop = subprocess.run([sys.executable, '-m', 'bnas_nni.cli', 'nni', 'stop', exp_id,
                                   '--scratch', str(scratch)], capture_output=True, text=True, timeout=120)
            result.update(stop_rc=stop.returncode, stop_stdout=stop.stdout, manager_pid=pid)
            stop_experiment(exp_id, env)            # by PID if nnictl stop left it running
            result['manager_alive_after_stop'] = pid_alive(pid)
        (workdir / 'result.json').write_text(json.dumps(result, indent=1))
    return 1 if 'error' in result else 0


if __name__ == '__main__':
    sys.exit(main())
