"""The ImageNet trainer under ``torchrun`` with 2 gloo processes on a tiny ImageFolder of real images.

The images are real Fashion-MNIST pictures rendered as 64 px RGB JPEGs in synset-named folders,
prepared with ``bnas-nni data prepare-imagenet``; the run uses the shipped ImageNet recipe with a
toy network and image size from the command line. torchrun runs in a private network namespace
where one exists (its rendezvous store would otherwise listen on every interface).
"""
import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from harness import Job, torchrun

from bnas_nni.cli import main
from bnas_nni.data import DEBIAN_FASHION_MNIST
from bnas_nni.paths import REPO_ROOT, experiments_dir

FASHION = Path(os.environ.get('BNAS_FASHION_MNIST') or DEBIAN_FASHION_MNIST)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (FASHION / 't10k-images-idx3-ubyte.gz').is_file(),
                                 reason='Debian dataset-fashion-mnist is not installed')]

CLASSES = {0: 'n00000000', 1: 'n00000001', 7: 'n00000007', 9: 'n00000009'}   # t-shirt, trouser, sneaker, boot
PER_CLASS = {'train': 12, 'val': 5}
N_VAL = len(CLASSES) * PER_CLASS['val'] + 1       # one extra: the shards of the 2 ranks differ in size


def _build_imagefolder(root: Path) -> None:
    from PIL import Image

    images = np.frombuffer(gzip.open(FASHION / 't10k-images-idx3-ubyte.gz').read(), np.uint8, offset=16)
    images = images.reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(FASHION / 't10k-labels-idx1-ubyte.gz').read(), np.uint8, offset=8)
    taken = {split: {k: 0 for k in CLASSES} for split in PER_CLASS}
    extra = True
    for i, (img, lab) in enumerate(zip(images, labels)):
        lab = int(lab)
        if lab not in CLASSES:
            continue
        split = 'train' if taken['train'][lab] < PER_CLASS['train'] else 'val'
        limit = PER_CLASS[split] + (1 if split == 'val' and extra and lab == 0 else 0)
        if taken[split][lab] >= limit:
            continue
        taken[split][lab] += 1
        out = root / split / CLASSES[lab] / f'{CLASSES[lab]}_{i}.JPEG'
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert('RGB').resize((64, 64), Image.BILINEAR).save(out, quality=92)
        if all(taken[s][k] >= PER_CLASS[s] + (1 if s == 'val' and k == 0 else 0) for s in PER_CLASS for k in CLASSES):
            break
    assert sum(taken['val'].values()) == N_VAL


# An NNI trial command channel (NNI_TRIAL_COMMAND_CHANNEL=import://module.Class, NNI's own hook) that
# hands out one parameter set and records who asked and what was reported, one JSON line per call.
CHANNEL = """
import json, os
from nni.runtime.trial_command_channel.base import TrialCommandChannel

def _record(**row):
    row['rank'] = os.environ.get('RANK')
    with open(os.environ['BNAS_TEST_CHANNEL_LOG'], 'a') as f:
        f.write(json.dumps(row) + '\\n')

class RecordingChannel(TrialCommandChannel):
    def receive_parameter(self):
        _record(call='receive_parameter')
        return {'parameter_id': 7, 'parameter_source': 'algorithm', 'parameter_index': 0,
                'parameters': {'init_channels': 6, 'weight_decay': 1e-4}}

    def send_metric(self, type, parameter_id, trial_job_id, sequence, value):
        _record(call='send_metric', type=type, parameter_id=parameter_id, value=value)
"""


def test_torchrun_two_gloo_processes_on_real_images(tmp_path, capsys):
    data = tmp_path / 'imnet'
    _build_imagefolder(data)
    assert main(['data', 'prepare-imagenet', str(data)]) == 0
    assert sorted(os.listdir(data / 'val')) == ['0', '1', '2', '3']
    run = tmp_path / 'run'
    cmd = [*torchrun(2, 'trainers/train_imagenet.py'),
           '--config', str(experiments_dir() / 'train_imagenet_bnas.yaml'), '--data', str(data),
           '--model', 'bnas-d', '--init-channels', '8', '--layers', '3', '--num-classes', '4', '--batch-size', '8',
           '--epochs', '2', '--workers', '0', '--threads', '1', '--device', 'cpu', '--run-dir', str(run),
           '--report-freq', '1', '--set', 'image_size=64', '--set', 'val_resize=72', '--set', 'progress=never']
    chan = tmp_path / 'chan'
    chan.mkdir()
    (chan / 'bnas_test_channel.py').write_text(CHANNEL)
    record = tmp_path / 'channel.jsonl'
    env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1', 'NNI_PLATFORM': 'local',
           'NNI_TRIAL_COMMAND_CHANNEL': 'import://bnas_test_channel.RecordingChannel',
           'BNAS_TEST_CHANNEL_LOG': str(record), 'NNI_OUTPUT_DIR': str(tmp_path / 'nni-trial'),
           'PYTHONPATH': os.pathsep.join(filter(None, [str(chan), os.environ.get('PYTHONPATH')]))}
    job = Job(cmd, env, tmp_path / 'torchrun.log', cwd=REPO_ROOT)      # in a loopback namespace where one exists
    try:
        rc = job.wait(400)
        output = job.output()
    finally:
        job.close()
    assert rc == 0, output[-3000:]
    assert not job.leftovers()
    log = (run / 'log.txt').read_text()
    assert 'world 2 on cpu; gloo' in log and 'classes=4' in log
    # NNI: rank 0 alone took the parameters, both ranks used them (DDP refuses differently shaped
    # replicas, and the CLI asked for C=8), and rank 0 alone reported 2 intermediate + 1 final results
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c['rank'] for c in calls if c['call'] == 'receive_parameter'] == ['0']
    assert 'C=6 L=3' in log
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert saved['init_channels'] == 6 and saved['weight_decay'] == 1e-4
    metrics = [c for c in calls if c['call'] == 'send_metric']
    assert {c['rank'] for c in metrics} == {'0'} and [c['type'] for c in metrics] == ['PERIODICAL'] * 2 + ['FINAL']
    assert all(c['parameter_id'] == 7 for c in metrics)
    reported = [json.loads(c['value']) if isinstance(c['value'], str) else c['value'] for c in metrics]
    assert set(reported[0]) == {'default', 'top5', 'loss'} and reported[2]['default'] == reported[1]['default']
    # 48 training images over 2 ranks in batches of 8: 3 steps per rank per epoch, logged by rank 0 only
    assert log.count('train 000') == 2 and log.count('train 002') == 2 and 'train 003' not in log
    assert log.count('epoch 1 lr') == 1                                 # rank 1 does not log
    assert 'PRINT' in (tmp_path / 'nni-trial' / 'trial.log').read_text()    # NNI captures stdout there
    with open(run / 'metrics.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert [float(r['valid_top1']) for r in rows] == pytest.approx([m['default'] for m in reported[:2]])
    import math
    assert float(rows[0]['lr']) == pytest.approx(0.05)
    assert float(rows[1]['lr']) == pytest.approx(0.05 * (1 + math.cos(math.pi * 1 / 50)) / 2)
    # validation top-1 over both ranks' shards equals a single-process evaluation of the checkpoint
    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(run), '--threads', '1', '--workers', '0']) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    top1 = float(out.split()[1])
    assert f'({N_VAL} images' in out
    assert top1 == pytest.approx(float(rows[-1]['valid_top1']), abs=1e-3)
    assert float(out.split()[3]) == pytest.approx(float(rows[-1]['valid_top5']), abs=1e-3)
