"""Searches as nnictl trials: per-epoch and final metrics reach the NNI manager (REST API)."""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from bnas_nni.integrations.nni.environment import nni_environment
from bnas_nni.integrations.nni.nnictl import nnictl_create, nnictl_stop
from bnas_nni.integrations.nni.rest import free_port, rest_get, wait_for_experiment

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 2


def _decode(data):
    # metric rows hold JSON that may itself be a JSON-encoded string
    value = json.loads(data)
    return json.loads(value) if isinstance(value, str) else value


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(('127.0.0.1', port)) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nnictl_search_grid_reports_intermediate_and_final(tmp_path, needs_fashion):
    config = yaml.safe_load((REPO / 'experiments' / 'nnictl_search_grid.yml').read_text())
    assert config['trialCommand'].startswith('python -m bnas_nni search')
    # the shipped grid, shrunk to two tiny trials
    config['searchSpace'] = {'seed': {'_type': 'choice', '_value': [1, 2]},
                             'lamda': {'_type': 'choice', '_value': [1.0]}}
    config['maxTrialNumber'] = 2
    config['trialConcurrency'] = 2
    config['trialCommand'] = (
        f'{sys.executable} -m bnas_nni search --config experiments/search_quick_fashion.yaml '
        f'--set epochs={EPOCHS} --set train_subset=192 --set batch_size=32 --set threads=1 '
        '--set final_train_subset=128 --set final_test_subset=128')
    config['trialCodeDirectory'] = str(REPO)
    config['experimentWorkingDirectory'] = str(tmp_path / 'nni-experiments')
    config['maxExperimentDuration'] = '8m'
    exp_yml = tmp_path / 'exp.yml'
    exp_yml.write_text(yaml.safe_dump(config))

    env = nni_environment(tmp_path, threads=1)          # HOME redirected, manager bound to 127.0.0.1
    assert env['HOME'].startswith(str(tmp_path.resolve()))
    port = free_port()
    exp_id = None
    try:
        exp_id = nnictl_create(exp_yml, port, env)
        status = wait_for_experiment(port, timeout=480)
        trials = rest_get(port, 'trial-jobs')
        metrics = rest_get(port, 'metric-data')
        assert status == 'DONE', (status, [(t['trialJobId'], t['status']) for t in trials])
        assert len(trials) == 2 and all(t['status'] == 'SUCCEEDED' for t in trials)
        for t in trials:
            rows = [m for m in metrics if m['trialJobId'] == t['trialJobId']]
            periodical = sorted((m for m in rows if m['type'] == 'PERIODICAL'), key=lambda m: m['sequence'])
            final = [m for m in rows if m['type'] == 'FINAL']
            assert len(periodical) == EPOCHS and len(final) == 1, rows
            first = _decode(periodical[0]['data'])
            assert set(first) >= {'default', 'arch_entropy', 'epoch'}
            assert 0.0 <= first['default'] <= 100.0 and 0.0 < first['arch_entropy'] <= 1.946      # percent
            data = _decode(final[0]['data'])
            # the final default is the same quantity as the intermediates: the best supernet val acc (percent);
            # the derived cell's accuracy is a named extra key
            assert data['default'] == pytest.approx(max(_decode(m['data'])['default'] for m in periodical))
            assert 0.0 <= data['derived_acc'] <= 100.0
            out = tmp_path / 'nni-experiments' / exp_id / 'environments' / 'local-env' / 'trials' / t['trialJobId']
            assert (out / 'genotype.yaml').is_file() and (out / 'genotype_imagenet.yaml').is_file()
            assert (out / 'search' / 'alpha_history.json').is_file()
        # the manifest went to the redirected HOME, not the real one
        assert (Path(env['HOME']) / 'nni-experiments' / '.experiment').is_file()
    finally:
        if exp_id is not None:
            assert nnictl_stop(exp_id, env)
            deadline = time.monotonic() + 30
            while _listening(port) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not _listening(port)
