"""Crafted and damaged packed files, and a worker process that loads and runs them.

Shared by tests/test_packed_validation.py, tests/test_packed_fuzz.py and bench/fuzz_packed.py (which runs
the same corpus on an engine built with AddressSanitizer and UBSan).

* :func:`tiny_packed_files` exports two small networks (CIFAR with every op type of the packed engine,
  ImageNet under the official-2020-08 precision rule: float stems, float convs behind signs) in a few
  seconds; their cells still have every structure the engine handles (op-by-op path at batch 1, the
  C++ cell program at batch 2, pools, residual convs, identity residuals).
* :func:`edit_header` / :func:`write_signed`: change header fields and write the file with a valid
  checksum -- what an attacker who knows the format does; :func:`corpus` makes many variants:
  truncations, byte flips in the header and in tensor data (checksum left as is), and signed edits of
  every kind of header field and of tensor bytes.
* :func:`run_corpus` loads and runs each file in worker subprocesses (``python packed_fuzz.py run``), so
  that a crash is recorded as a signal for that file instead of killing the test process, and a new
  worker carries on with the next file. Each result is ``ok`` (ran; the same logits twice at batch 1
  and 2 on every instruction-set path), ``refused`` (a one-line BNASError), ``raw`` (any other
  exception), ``nondeterministic``, ``signal`` / ``exit`` (the worker died) or ``timeout``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

HERE = Path(__file__).resolve().parent
IMAGE_SIZE = {'cifar': 8, 'imagenet': 32}

# every op the packed engine runs, on cell inputs and on nodes (stride 2 and 1 in reduction cells)
ALL_OPS_GENOTYPE = {
    'name': 'all_packed_ops',
    'normal': [['bin_conv_3x3', 0], ['bin_dil_conv_3x3', 1], ['avg_pool_3x3', 2], ['bin_conv_5x5', 1],
               ['zeroise', 0], ['bin_dil_conv_5x5', 3], ['zeroise', 2], ['zeroise', 3]],
    'normal_concat': [2, 3, 4, 5],
    'reduce': [['max_pool_3x3', 0], ['bin_conv_3x3', 1], ['avg_pool_3x3', 1], ['bin_dil_conv_3x3', 2],
               ['max_pool_3x3', 3], ['zeroise', 0], ['bin_conv_5x5', 2], ['zeroise', 4]],
    'reduce_concat': [2, 3, 4, 5],
}


# -- building and editing files ------------------------------------------------------------------------

def _random_bn_(model, seed: int) -> None:
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                C = bn.num_features
                bn.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                if bn.affine:
                    bn.weight.copy_(torch.randn(C, generator=g))
                    bn.bias.copy_(torch.randn(C, generator=g) * 0.5)


def tiny_packed_files(folder: Path) -> Dict[str, Path]:
    """``{'cifar': path, 'imagenet': path}``: two small exported networks (see the module docstring)."""
    import torch

    from bnas_nni import deploy
    from bnas_nni.genotypes import Genotype
    from bnas_nni.networks import build_model

    folder.mkdir(parents=True, exist_ok=True)
    specs = {
        'cifar': ('bnas-a', dict(genotype=Genotype.from_dict(ALL_OPS_GENOTYPE, name='all_packed_ops'),
                                 init_channels=8, layers=5)),
        'imagenet': ('bnas-d', dict(init_channels=8, layers=4, num_classes=7, precision_rule='official-2020-08')),
    }
    out = {}
    for name, (config, overrides) in specs.items():
        torch.manual_seed(0)
        model = build_model(config, **overrides).eval()
        _random_bn_(model, seed=1)
        out[name] = folder / f'{name}.bnp'
        deploy.export_packed(model, out[name])
    return out


def read_file(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the bnas-nni header as parsed JSON, the tensors) of a packed file."""
    from safetensors import safe_open

    with safe_open(str(path), framework='pt', device='cpu') as f:
        header = json.loads(f.metadata()['bnas_nni'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return header, tensors


def signed_bytes(header: Dict[str, Any], tensors: Dict[str, Any]) -> bytes:
    """A packed file of ``header`` and ``tensors`` with a correct checksum."""
    from safetensors.torch import save

    from bnas_nni.deploy.format import CHECKSUM_KEY, METADATA_KEY, checksum

    text = json.dumps(header)
    return save(tensors, metadata={METADATA_KEY: text, CHECKSUM_KEY: checksum(text, tensors)})


def write_signed(path: Path, header: Dict[str, Any], tensors: Dict[str, Any]) -> Path:
    path.write_bytes(signed_bytes(header, tensors))
    return path


Path_ = Tuple[Any, ...]


def edit_header(header: Dict[str, Any], where: str | Path_, value: Any = None, *,
                delete: bool = False) -> Dict[str, Any]:
    """A copy of ``header`` with the field at ``where`` (``'network.cells.0.preprocess1.conv.padding'`` or
    a tuple of keys) set to ``value``, or removed."""
    header = copy.deepcopy(header)
    if isinstance(where, str):
        keys: List[Any] = [int(k) if k.lstrip('-').isdigit() else k for k in where.split('.')]
    else:
        keys = list(where)
    node = header
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return header


#: crafted files of the regression tests: name -> (field of the CIFAR file to edit, new value or DELETE, what the
#: one-line refusal must contain)
DELETE = object()
CASES = {
    # heap write out of bounds at batch 1 (row packing of binary_conv) and batch 2 (the cell program)
    'pad-1-batch1': ('network.cells.0.preprocess1.conv.padding', -1, 'cells[0].preprocess1.conv.padding = -1'),
    'pad-1-batch2': ('network.cells.1.preprocess0.conv.padding', -1, 'cells[1].preprocess0.conv.padding = -1'),
    # SIGFPE: a pool with stride 0 (op by op), a conv with stride 0 (cell program at batch 2)
    'pool-stride-0': ('network.cells.1.ops.0.stride', 0, 'cells[1].ops[0].stride = 0'),
    'conv-stride-0': ('network.cells.0.ops.0.conv.stride', 0, 'cells[0].ops[0].conv.stride = 0'),
    'dilation-0': ('network.cells.0.ops.1.conv.dilation', 0, 'cells[0].ops[1].conv.dilation = 0'),
    # logits from uninitialised memory
    'concat-past-last-node': ('network.cells.0.concat.3', 6, 'cells[0].concat[3] = 6'),
    'input-past-own-node': ('network.cells.0.indices.2', 3, 'cells[0].indices[2] = 3 is out of range'),
    'input-not-in-genotype': ('network.cells.0.indices.2', 1, 'disagrees with architecture.genotype.normal[2]'),
    # structural edits that used to load silently
    'residual-removed': ('network.cells.2.residual', None, "cells[2].residual = None must be 'identity'"),
    'residual-key-deleted': ('network.cells.2.residual', DELETE, 'cells[2].residual is missing'),
    'reduction-residual-removed': ('network.cells.1.residual', 'identity', 'cells[1].residual'),
    'relu-flag-2': ('network.cells.0.ops.0.relu', 2, 'cells[0].ops[0].relu = 2'),
    'op-type-swapped': ('network.cells.1.ops.0.type', 'avg_pool', 'is not the max_pool_3x3'),
    'reduction-flag-flipped': ('network.cells.2.reduction', True, 'cells[2].reduction = True'),
    # a storage-size overflow and a raw exception once
    'huge-padding': ('network.cells.0.ops.1.conv.padding', 10 ** 12, 'cells[0].ops[1].conv.padding = 1000000000000'),
    'huge-channels': ('network.cells.0.preprocess1.conv.out', 2 ** 40, 'cells[0].preprocess1.conv.out'),
    # values that only look like numbers
    'string-index': ('network.cells.0.indices.0', '0', "cells[0].indices[0] = '0'"),
    'string-stride': ('network.cells.0.preprocess1.conv.stride', '1', "cells[0].preprocess1.conv.stride = '1'"),
    'float-index': ('network.cells.0.indices.0', 1.5, 'cells[0].indices[0] = 1.5'),
    'bool-channels': ('network.in_channels', True, 'network.in_channels = True'),
    'string-relu': ('network.cells.0.preprocess0.relu', 'true', "cells[0].preprocess0.relu = 'true'"),
    # channel counts that do not follow from the previous layer, tensors that do not fit
    'channels-disagree': ('network.cells.3.preprocess1.conv.in', 48,
                          'cells[3].preprocess1.conv.in = 48 does not match the 64'),
    'tensor-swapped': ('network.cells.0.ops.0.conv.bits', {'$tensor': 'cells.0.ops.0.conv.alpha'},
                       'cells[0].ops[0].conv.bits = tensor float32'),
    'kernel-unsupported': ('network.cells.0.ops.0.conv.kernel', [13, 13], 'cells[0].ops[0].conv.kernel[0] = 13'),
    'padding-wrong-for-kernel': ('network.cells.0.ops.0.conv.padding', 0, 'cells[0].ops[0].conv.padding = 0'),
    'family-unknown': ('network.family', 'mnist', "network.family = 'mnist'"),
    'no-cells': ('network.cells', [], 'cells has 0 entries'),
    'eps-nan': ('network.cells.1.residual.bn.eps', -1.0, 'cells[1].residual.bn.eps = -1.0'),
    'architecture-not-a-mapping': ('architecture', ['x'], "architecture = ['x'] must be a mapping"),
    'genotype-name-not-text': ('architecture.genotype', {'name': 5}, 'architecture.genotype.name = 5'),
}


def crafted_file(base: Path, name: str, folder: Path) -> Path:
    """``base`` with the edit of ``CASES[name]``, signed, as ``folder/NAME.bnp``."""
    where, value, _ = CASES[name]
    header, tensors = read_file(base)
    header = edit_header(header, where, delete=True) if value is DELETE else edit_header(header, where, value)
    return write_signed(folder / f'{name}.bnp', header, tensors)


# -- the corpus ------------------------------------------------------------------------------------------

def _leaves(obj: Any, prefix: Path_ = ()) -> Iterator[Tuple[Path_, Any]]:
    """(key path, value) of every field, containers included (a tensor reference counts as a leaf)."""
    if prefix:
        yield prefix, obj
    if isinstance(obj, dict) and set(obj) != {'$tensor'}:
        for k, v in obj.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))


def _dotted(path: Path_) -> str:
    return '.'.join(map(str, path))


def _replacements(value: Any, tensor_names: Sequence[str], rng: random.Random) -> List[Any]:
    """Values of other types and out-of-domain values for a field holding ``value``."""
    if isinstance(value, bool):
        return [not value, 2, -1, 'true', '1', None, 1.0, []]
    if isinstance(value, int):
        return [-1, 0, value + 1, value - 1, 2 * value + 1, 10 ** 12, -10 ** 12, 2 ** 63 - 1, str(value), '0',
                value + 0.5, float(value), True, None, [value], {}]
    if isinstance(value, float):
        return [-value, 0.0, -1.0, 1e308, float('nan'), float('inf'), str(value), None, 1, True]
    if isinstance(value, str):
        return ['', 'unit', 'max_pool', 'avg_pool', 'zeroise', 'identity', 'sign', 'float', 'conv', 'bn', 'relu',
                'imagenet', 'cifar', value + 'x', 'x' * 5000, 0, None, [value]]
    if value is None:
        return ['identity', {}, 0, [], 'x']
    if isinstance(value, list):
        out: List[Any] = [[], value[:-1], value + value[-1:], value[::-1], None, 0, {}]
        if value:
            out.append(value * 3)
        return out
    if isinstance(value, dict) and set(value) == {'$tensor'}:
        return [{'$tensor': rng.choice(tensor_names)}, {'$tensor': 'missing'}, {'$tensor': 5},
                {'$tensor': [value['$tensor']]}, None, 0]
    if isinstance(value, dict):
        out = [{}, None, [], 'identity']
        for k in list(value)[:6]:
            out.append({kk: vv for kk, vv in value.items() if kk != k})
        return out
    return [None]


def corpus(base: Path, n: int, seed: int = 0) -> Iterator[Tuple[str, bytes]]:
    """``n`` variants of packed file ``base``: (a name saying what was done, the file's bytes)."""
    import torch

    rng = random.Random(seed)
    raw = base.read_bytes()
    header_len = int.from_bytes(raw[:8], 'little')
    data_start = 8 + header_len
    header, tensors = read_file(base)
    names = sorted(tensors)
    fields = list(_leaves(header))
    network_fields = [f for f in fields if f[0][0] == 'network']
    kinds = ['truncate', 'flip_header', 'flip_data', 'edit', 'edit', 'edit', 'edit', 'edit_network', 'edit_network',
             'tensor_bytes', 'delete']
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == 'truncate':
            cut = rng.choice([0, 4, 8, 9, data_start - 1, data_start, data_start + 1, len(raw) - 1,
                              rng.randrange(len(raw))])
            yield f'{i:04d}-truncate-{cut}', raw[:cut]
        elif kind in ('flip_header', 'flip_data'):
            lo, hi = (8, data_start) if kind == 'flip_header' else (data_start, len(raw))
            pos = rng.randrange(lo, hi)
            data = bytearray(raw)
            data[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
            yield f'{i:04d}-{kind}-{pos}', bytes(data)
        elif kind in ('edit', 'edit_network'):
            path, value = rng.choice(fields if kind == 'edit' else network_fields)
            new = rng.choice(_replacements(value, names, rng))
            edited = edit_header(header, path, new)
            yield f'{i:04d}-edit-{_dotted(path)}={json.dumps(new)[:40]}', signed_bytes(edited, tensors)
        elif kind == 'tensor_bytes':
            name = rng.choice(names)
            t = {k: v.clone() for k, v in tensors.items()}
            flat = t[name].view(-1).view(torch.uint8) if t[name].numel() else None
            if flat is not None:
                for _ in range(rng.randrange(1, 4)):
                    flat[rng.randrange(flat.numel())] = rng.randrange(256)
            yield f'{i:04d}-tensor-{name}', signed_bytes(header, t)
        else:
            containers = [(p, v) for p, v in network_fields if isinstance(v, (dict, list)) and v and
                          not (isinstance(v, dict) and set(v) == {'$tensor'})]
            path, value = rng.choice(containers)
            key = rng.choice(list(value) if isinstance(value, dict) else range(len(value)))
            edited = edit_header(header, path + (key,), delete=True)
            yield f'{i:04d}-delete-{_dotted(path + (key,))}', signed_bytes(edited, tensors)


def write_corpus(bases: Dict[str, Path], folder: Path, per_base: int, seed: int = 0) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for b, (name, base) in enumerate(sorted(bases.items())):
        for case, data in corpus(base, per_base, seed + b):
            safe = ''.join(ch if ch.isalnum() or ch in '-=._' else '_' for ch in case)[:120]
            path = folder / f'{name}-{safe}.bnp'
            path.write_bytes(data)
            files.append(path)
    return files


# -- running files in worker processes -------------------------------------------------------------------

def _images(family: str, batch: int):
    import torch

    size = IMAGE_SIZE.get(family, 8)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _run_one(path: Path) -> Dict[str, Any]:
    import torch

    from bnas_nni import deploy
    from bnas_nni.deploy.kernels import supported_isas
    from bnas_nni.errors import BNASError

    try:
        net = deploy.load(path)
        digest = hashlib.sha256()
        for isa in supported_isas():
            net.set_isa(isa)
            for batch in (1, 2):
                x = _images(net.family, batch)
                a, b = net(x), net(x)
                if not torch.equal(a.view(torch.int32), b.view(torch.int32)):
                    return {'result': 'nondeterministic', 'detail': f'{isa} batch {batch}'}
                digest.update(a.numpy().tobytes())
        return {'result': 'ok', 'detail': digest.hexdigest()[:16]}
    except BNASError as exc:
        return {'result': 'refused', 'detail': str(exc)}
    except Exception as exc:  # noqa: BLE001 - what the fuzz test counts
        first = (str(exc).strip().splitlines() or [''])[0][:300]
        return {'result': 'raw', 'detail': f'{type(exc).__name__}: {first}'}


def _load_sanitized_engine() -> None:
    """Swap in the engine built with -fsanitize=address,undefined (own extension name; see bench/fuzz_packed.py)."""
    from bnas_nni.deploy import kernels
    from bnas_nni.extensions import load_extension

    src = kernels._csrc()
    flags = ['-fsanitize=address,undefined', '-fno-omit-frame-pointer', '-fno-sanitize-recover=all', '-g']
    ext = load_extension('bnas_nni_deploy_sanitized', [src / s for s in kernels._SOURCES], include_dirs=[src],
                         extra_cflags=['-fopenmp', '-ffp-contract=off', *flags],
                         extra_ldflags=['-fopenmp', '-fsanitize=address,undefined'], what='the sanitized packed engine')
    kernels.extension = lambda: ext


def _worker(list_file: str) -> int:
    for line in Path(list_file).read_text().splitlines():
        result = _run_one(Path(line))
        print(json.dumps({'file': line, **result}), flush=True)
    return 0

def _entry_points(path: str) -> int:
    """Call the C++ entry points with bad arguments past the validation; one line per call (see
    tests/test_packed_validation.py)."""
    import torch

    from bnas_nni import deploy
    from bnas_nni.deploy import kernels

    ext = kernels.extension()
    isa = kernels.isa_id(kernels.supported_isas()[-1])
    net = deploy.load(path)
    cell0, cell1 = net.cells[0], net.cells[1]
    u, u3 = cell0.pre1, cell0.ops[0]                 # packed units: 1x1, 3x3

    def cl(*shape):
        return torch.randn(shape).contiguous(memory_format=torch.channels_last)

    x = cl(1, u.in_ch, 4, 4)

    def conv(unit, x, out, k, s, p, d, t_zero=None):
        ext.binary_conv(x, unit.t_zero if t_zero is None else t_zero, unit.t_pos, unit.flip, unit.words, unit.alpha,
                        out, k, k, s, p, d, True, False, isa)

    def program(cell, target, attr, value):
        old = getattr(target, attr)
        setattr(target, attr, value)
        try:
            cell._program = None
            o = 2 if cell.reduction else 4
            out = cl(2, len(cell.concat) * cell.C, o, o)
            cell.program().run(cl(2, cell.pre0.in_ch, 4, 4), cl(2, cell.pre1.in_ch, 4, 4), out, None, isa, None)
        finally:
            setattr(target, attr, old)
            cell._program = None

    cases = {
        'conv padding -1': lambda: conv(u, x, cl(1, u.out_ch, 2, 2), 1, 1, -1, 1),
        'conv stride 0': lambda: conv(u, x, cl(1, u.out_ch, 4, 4), 1, 0, 0, 1),
        'conv dilation 0': lambda: conv(u, x, cl(1, u.out_ch, 4, 4), 1, 1, 0, 0),
        'conv padding past the kernel': lambda: conv(u, x, cl(1, u.out_ch, 6, 6), 1, 1, 1, 1),
        'conv window larger than the input': lambda: conv(u3, cl(1, u3.in_ch, 1, 1), cl(1, u3.out_ch, 1, 1),
                                                          3, 3, 0, 1),
        'conv thresholds too short': lambda: conv(u, x, cl(1, u.out_ch, 4, 4), 1, 1, 0, 1, t_zero=u.t_zero[:1]),
        'pool stride 0': lambda: ext.pool2d(x, cl(1, u.in_ch, 4, 4), 3, 0, 1, True, False, isa),
        'pool on an empty map': lambda: ext.pool2d(cl(1, u.in_ch, 0, 0), cl(1, u.in_ch, 1, 1), 3, 2, 1, True, False,
                                                   isa),
        'pack padding -1': lambda: ext.pack_signs(x, u.t_zero, u.t_pos, u.flip, -1, isa),
        'cell program conv stride 0': lambda: program(cell0, cell0.ops[0], 'stride', 0),
        'cell program padding -1': lambda: program(cell0, cell0.pre1, 'padding', -1),
        'cell program pool stride 0': lambda: program(cell1, cell1.ops[0], 'stride', 0),
    }
    program(cell0, cell0.pre1, 'padding', 0)      # the unchanged programs run
    program(cell1, cell1.ops[0], 'stride', 2)
    for name, call in cases.items():
        try:
            call()
            print(f'{name}: ACCEPTED', flush=True)
        except RuntimeError as exc:
            print(f'{name}: RuntimeError: {str(exc).splitlines()[0]}', flush=True)
    return 0


def run_entry_points(path: Path, sanitized: bool = False, timeout: float = 600.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__).resolve()), 'entry-points', str(path)]
    return subprocess.run(cmd + (['--sanitized'] if sanitized else []), capture_output=True, text=True,
                          env=worker_env(sanitized), timeout=timeout)


def worker_env(sanitized: bool = False) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env.pop('PYTHONFAULTHANDLER', None)   # a crash is reported by its signal
    if sanitized:
        libs = [subprocess.run(['g++', f'-print-file-name={name}'], capture_output=True, text=True).stdout.strip()
                for name in ('libasan.so', 'libstdc++.so')]
        # python itself is not instrumented: the ASan runtime must come first, and libstdc++ must be there
        # when it starts (else its __cxa_throw interceptor finds nothing and the first C++ exception aborts)
        env['LD_PRELOAD'] = ' '.join(libs)
        env['ASAN_OPTIONS'] = 'detect_leaks=0:alloc_dealloc_mismatch=0:verify_asan_link_order=0:abort_on_error=0'
        env['UBSAN_OPTIONS'] = 'halt_on_error=1:print_stacktrace=1'
    return env


def run_corpus(files: Sequence[Path], *, sanitized: bool = False, timeout: float = 600.0,
               chunk: int = 0) -> List[Dict[str, Any]]:
    """One result per file (see the module docstring), in order; a worker that dies is replaced."""
    results: List[Dict[str, Any]] = []
    pending = [str(f) for f in files]
    env = worker_env(sanitized)
    with tempfile.TemporaryDirectory() as tmp:
        while pending:
            batch = pending[:chunk] if chunk else pending
            list_file = Path(tmp) / 'files.txt'
            list_file.write_text('\n'.join(batch) + '\n')
            cmd = [sys.executable, str(Path(__file__).resolve()), 'run', str(list_file)]
            if sanitized:
                cmd.append('--sanitized')
            start = time.monotonic()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
                out, err, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or '')
                err, rc = 'timeout', None
            done = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
            results.extend(done)
            if len(done) < len(batch):       # the worker died (or hung) on batch[len(done)]
                tail = ' | '.join(err.strip().splitlines()[-3:])[:500]
                if rc is None:
                    what = 'timeout'
                elif rc < 0:
                    what = 'signal'
                else:
                    what = 'exit'
                results.append({'file': batch[len(done)], 'result': what,
                                'detail': f'rc={rc} after {time.monotonic() - start:.0f}s: {tail}'})
                pending = pending[len(done) + 1:]
            else:
                pending = pending[len(batch):]
    return results


if __name__ == '__main__':
    if len(sys.argv) >= 3 and sys.argv[1] in ('run', 'entry-points'):
        if '--sanitized' in sys.argv[3:]:
            _load_sanitized_engine()
        sys.exit(_worker(sys.argv[2]) if sys.argv[1] == 'run' else _entry_points(sys.argv[2]))
    print('usage: packed_fuzz.py run LIST_FILE | entry-points PACKED_FILE [--sanitized]  (see bench/fuzz_packed.py)',
          file=sys.stderr)
    sys.exit(2)
