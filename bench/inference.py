#!/usr/bin/env python
"""CPU inference of searched binary networks: PyTorch fp32 vs the packed 1-bit engine vs onnxruntime.

For each network (default: BNAS-A, C=36, L=20; the ``latest_cell`` CIFAR net, C=36, L=20; bnas-d, the
ImageNet config, 224x224), with trained-looking random BN statistics, the bench

* exports it once as a packed file and as ONNX and prints the model sizes (fp32 state dict, packed file
  and its binary part, ONNX);
* times, **in one process and interleaved run by run** (``--spin``: in turns of 4 runs, see SPIN), at batch 1
  and 32 with 2 threads:
  (a) PyTorch fp32 eval of the float-simulated network, (b) the packed engine on each instruction-set
  path (``avx512``, ``avx2``, ``portable``), (c) onnxruntime fp32 and (d) onnxruntime int8 (static QDQ
  quantization, per-channel weights, activations calibrated on Fashion-MNIST-32x3 training images; 2
  intra-op threads, sequential); medians and minima of the timed runs after a warm-up, latency and
  images/s, ratios against (a) and against onnxruntime int8, and the largest logit difference against (a);
* measures the top-1 agreement of every method with the float model on held-out (test) images;
* prints a roofline: the machine's peak XNOR/popcount and fp32 FMA throughput (micro-benchmarks of the
  engine's instruction mix on the VPOPCNTQ and AVX2 paths, measured between the profiled runs), the
  network's binary and full-precision MACs, the time those take at peak, and the achieved fraction per
  layer kind of the engine's profile, and for the binary convs also per input width;
* times the binary conv layers alone (the float model's ``BN -> sign -> binary conv -> ReLU`` modules, and
  react blocks ``BN -> RSign -> binary conv [+ shortcut] -> (R)PReLU`` whole, via hooks vs the engine's
  binary layers, epilogues included) and prints a per-layer breakdown of the engine;
* measures peak memory in a fresh process per method (RSS high-water mark, and its growth over the
  loaded model) at the largest batch;
* checks the issue's targets on BNAS-A (engine >= 5x fp32 at batch 1, >= 3x at batch 32, binary layers
  >= 8x, binary part of the file <= 1/25 of fp32).

A method whose warm-up run takes longer than ``--budget`` seconds is timed by that one run (the portable
path at batch 32 on ImageNet). The machine is shared: compare the ratios of one run, and rerun in a quiet
sitting for figures to quote.

Examples::

    python bench/inference.py                       # the full run (several minutes on 2 cores)
    python bench/inference.py --quick               # smoke check: BNAS-A only, batch 1 and 4, few repeats
    python bench/inference.py --configs bnas-a --batch 1 32 --json runs/inference.json
    python bench/inference.py --configs bnas-a --batch 1 32 --no-memory --repeats 11   # the engine-speed table
    python bench/inference.py --configs bnas-a --batch 1 32 --no-memory --repeats 6 --spin
        # the same with each runtime's default thread waiting (a quiet machine), methods in turns of 4 runs
    python bench/inference.py --configs bnas-a --checkpoint runs/quick --fp-parts int8 --no-memory
        # also a trained network, and the engine with fp_parts='int8' beside the bit-exact default
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Thread waiting, the same policy on both sides: by default no runtime's threads spin between parallel regions
# (OMP_WAIT_POLICY=PASSIVE for PyTorch and the engine, allow_spinning=0 for onnxruntime), as a shared machine
# needs, and methods alternate run by run; --spin gives each runtime its own default (libgomp spins briefly
# then sleeps; onnxruntime's workers spin), what an application on a quiet machine gets, and methods
# alternate in turns of 4 consecutive runs, the first untimed, so that one runtime's spinning threads do not
# land in another's timed runs. Set before any OpenMP runtime starts.
SPIN = '--spin' in sys.argv[1:]
if SPIN:
    os.environ.pop('OMP_WAIT_POLICY', None)
else:
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {  # name -> (model config, overrides, image size)
    'bnas-a': ('bnas-a', {}, 32),
    'cifar-latest-cell': ('bnas-a', {'genotype': 'latest_cell'}, 32),
    'bnas-d': ('bnas-d', {}, 224),
}
ISAS_ORDER = ('avx512', 'avx2', 'portable')
TARGETS = {'b1': 5.0, 'b32': 3.0, 'binary_layers': 8.0, 'binary_part': 25.0, 'vs_int8': 4.0, 'roofline': 0.5}


def trained_like_bn_(model, seed: int = 1) -> None:
    """Random BN statistics and affine terms, as after training (thresholds away from 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                C = bn.num_features
                bn.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                if bn.affine:
                    bn.weight.copy_(torch.randn(C, generator=g))
                    bn.bias.copy_(torch.randn(C, generator=g) * 0.5)


def build_trained(path: str):
    """A trained network from a checkpoint or run directory (its own BN statistics), and its image size."""
    from bnas_nni.checkpoints import load_checkpoint_file, model_from_checkpoint, resolve_checkpoint_path

    model = model_from_checkpoint(load_checkpoint_file(resolve_checkpoint_path(path))).eval()
    return model, 224 if model.family == 'imagenet' else 32


def build(config: str):
    import torch

    from bnas_nni.networks import build_model

    name, overrides, size = CONFIGS[config]
    torch.manual_seed(0)
    model = build_model(name, **overrides).eval()
    trained_like_bn_(model)
    return model, size


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not SPIN:   # onnxruntime's workers spin after each run by default (see SPIN)
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])


def dataset_images(n: int, size: int, train: bool):
    """``n`` Fashion-MNIST-32x3 images (the offline default data set; training or test split), resized to
    ``size``; random normal images (said in the output) when the data set is not installed."""
    import torch
    import torch.nn.functional as F

    try:
        from bnas_nni.data import FashionMNIST32

        ds = FashionMNIST32(train=train, subset=n)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        source = f'Fashion-MNIST-32x3 {"training" if train else "test"} images'
    except Exception as exc:  # noqa: BLE001 -- any missing/unreadable data set: fall back, and say so
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7 if train else 8))
        source = f'random normal images (Fashion-MNIST unavailable: {str(exc).splitlines()[0][:80]})'
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return x.contiguous(), source


def quantize_onnx_int8(onnx_path: Path, out_path: Path, calibration) -> None:
    """onnxruntime static quantization: QDQ format, per-channel int8 weights, uint8 activations (the U8S8
    pair onnxruntime's x86 kernels are fastest with, VNNI where present), min/max calibrated on ``calibration``
    (a float tensor of images, fed in batches of 8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{'images': calibration[i:i + 8].numpy()} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # per-op notes (BN scales have no channel axis, pre-processing advice)
    try:
        quantize_static(str(onnx_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def top1_agreement(model, runners: dict, images, batch: int = 32) -> dict:
    """Per method: the fraction of ``images`` whose top-1 class equals the float model's."""
    import torch

    with torch.no_grad():
        ref = torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
        out = {}
        for name, run in runners.items():
            pred = torch.cat([torch.as_tensor(run(images[i:i + batch])).argmax(1)
                              for i in range(0, len(images), batch)])
            out[name] = float((pred == ref).float().mean())
    out['_classes'] = int(ref.unique().numel())
    return out


# --------------------------------------------------------------------------- roofline


def layer_macs(net, size: int) -> dict:
    """Per profile entry name: (kind, binary MACs, full-precision MACs, input channels) of one image through the
    packed network (a binary MAC: one sign x sign-weight product on the XNOR/popcount kernels; everything else,
    including convs that the engine runs as float ops, counts as full precision)."""
    def unit(u, h, w):
        oh, ow = u.out_hw(h, w)
        macs = u.out_ch * u.in_ch * u.kernel[0] * u.kernel[1] * oh * ow
        return (u.kind, macs, 0, u.in_ch) if u.packed else (u.kind, 0, macs, u.in_ch)

    out = {}
    if net.family != 'cifar':
        raise ValueError('layer_macs: the roofline covers the CIFAR family (stem as one unit)')
    out['stem'] = ('float stem',) + unit(net.stem, size, size)[1:]
    h0 = w0 = h1 = w1 = size
    for cell in net.cells:
        H, W = h1, w1
        oh, ow = ((H - 1) // 2 + 1, (W - 1) // 2 + 1) if cell.reduction else (H, W)
        out[f'{cell.name}.preprocess0'] = unit(cell.pre0, h0, w0)
        out[f'{cell.name}.preprocess1'] = unit(cell.pre1, H, W)
        for k, (op, idx) in enumerate(zip(cell.ops, cell.indices)):
            if op is not None and hasattr(op, 'packed'):
                out[f'{cell.name}.ops.{k}'] = unit(op, *((H, W) if idx < 2 else (oh, ow)))
        if hasattr(cell.residual, 'packed'):
            out[f'{cell.name}.residual'] = unit(cell.residual, H, W)
        h0, w0, h1, w1 = H, W, oh, ow
    out['head'] = ('float head', 0, net.fc_weight.numel(), net.fc_weight.shape[1])
    return out


def peak_rates(isas) -> dict:
    """Peak MACs per CPU-second (one thread busy for one second) of this sitting: binary on each SIMD path, fp32
    FMA (AVX-512 where present). CPU seconds, not wall seconds: on a shared machine a thread that is switched
    out counts for neither the peak nor the layers it is compared with."""
    from bnas_nni.deploy.kernels import extension, isa_id

    ext = extension()
    jobs = [(f'binary {isa}', 'binary', isa, iters) for isa, iters in (('avx512', 2_000_000), ('avx2', 1_000_000))
            if isa in isas]
    fma_isa = 'avx512' if 'avx512' in isas else 'avx2'
    if fma_isa in isas:
        jobs.append(('fma', 'fma', fma_isa, 2_000_000))
    rates = {}
    for name, kind, isa, iters in jobs:
        t0, c0 = time.perf_counter(), time.process_time()
        per_wall_s = ext.peak_macs(kind, isa_id(isa), iters)     # all threads' MACs / the call's wall time
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rates[name] = per_wall_s * wall / max(cpu, 1e-9)
    return rates


def roofline(net, x, isa: str, isas, repeats: int) -> dict:
    """Peak rates and the per-kind profile of ``net`` on ``x`` (CPU seconds of each layer), measured in turns
    (peak, profile, peak, ...), so each fraction compares a profile with the peak of its own moment; medians.
    Binary convs are also split by their input channels ('widths'): the bits per output that a conv's
    XNOR/popcount work is spread over decide how much of its time packing and the epilogue take."""
    import torch

    macs = layer_macs(net, x.shape[-1])
    net.set_isa(isa)
    samples = []
    with torch.no_grad():
        net(x)
        for _ in range(repeats):
            rates = peak_rates(isas)
            _, records = net.profile(x, cpu=True)
            kinds, widths = {}, {}
            for name, kind, t, c in records:
                known = name in macs and macs[name][0] == kind   # (a cell's residual conv and its add share a name)
                groups = [kinds.setdefault(kind, [0.0, 0.0, 0, 0])]
                if known and kind.startswith('binary conv'):
                    groups.append(widths.setdefault(f'{kind}, {macs[name][3]} channels in', [0.0, 0.0, 0, 0]))
                for acc in groups:
                    acc[0] += t
                    acc[1] += c
                    if known:
                        acc[2] += macs[name][1] * x.shape[0]
                        acc[3] += macs[name][2] * x.shape[0]
            samples.append((rates, kinds, widths))
    med = statistics.median
    rates = {k: med(s[0][k] for s in samples) for k in samples[0][0]}
    bkey = f'binary {isa}'

    def ideal(r, bmacs, fmacs):   # CPU seconds at peak
        return (bmacs / r[bkey] if bmacs and bkey in r else 0.0) + (fmacs / r['fma'] if fmacs and 'fma' in r else 0.0)

    def summarise(part: int) -> dict:   # part 1: the kinds, 2: the binary convs' widths
        table = {}
        for key in samples[0][part]:
            _, _, bmacs, fmacs = samples[0][part][key]
            frac = [ideal(s[0], bmacs, fmacs) / s[part][key][1] for s in samples if s[part][key][1] > 0]
            table[key] = {'seconds': med(s[part][key][0] for s in samples),
                          'cpu_s': med(s[part][key][1] for s in samples), 'binary_macs': bmacs, 'fp_macs': fmacs,
                          'ideal_cpu_s': ideal(rates, bmacs, fmacs),
                          'fraction': med(frac) if (bmacs or fmacs) and frac else None}
        return table

    table = summarise(1)
    bin_kinds = [k for k in table if k.startswith('binary conv')]
    frac = [sum(ideal(r, k[kind][2], 0) for kind in bin_kinds) / max(sum(k[kind][1] for kind in bin_kinds), 1e-12)
            for r, k, _ in samples]
    return {'rates': rates, 'kinds': table, 'widths': summarise(2),
            'binary_fraction': med(frac) if bin_kinds else None,
            'binary_macs_per_image': sum(v[1] for v in macs.values()),
            'fp_macs_per_image': sum(v[2] for v in macs.values()), 'runs': repeats, 'isa': isa,
            'threads': torch.get_num_threads()}


def print_roofline(r: dict, batch: int) -> None:
    rates, threads = r['rates'], r['threads']
    print(f'{"":9}roofline, batch {batch} (medians of {r["runs"]} turns of micro-benchmark + profiled forward, '
          f'packed {r["isa"]}; CPU seconds where they can be had -- ops inside cell programs are timed by their '
          'thread\'s clock, which also counts time switched out on a shared machine):',
          flush=True)
    print(f'{"":11}peak per busy thread: ' + ', '.join(f'{k} {v / 1e9:,.1f} GMAC/s' for k, v in rates.items()) +
          f'; x {threads} threads: ' + ', '.join(f'{k} {threads * v / 1e9:,.0f}' for k, v in rates.items()),
          flush=True)
    b, f = r['binary_macs_per_image'], r['fp_macs_per_image']
    bkey = f'binary {r["isa"]}'
    line = f'{"":11}network per image: {b:.3g} binary MACs, {f:.3g} full-precision MACs'
    if bkey in rates and 'fma' in rates:
        tb, tf = b / rates[bkey] / threads, f / rates['fma'] / threads
        line += (f'; at peak on {threads} threads {tb * 1e3:.3f} ms binary + {tf * 1e3:.3f} ms fp per image, '
                 f'{(tb + tf) * batch * 1e3:.2f} ms for the batch')
    print(line, flush=True)
    width = max([36] + [len(k) + 2 for k in r.get('widths', {})])
    print(f'{"":11}{"layer kind":<{width}}{"wall ms":>9}{"CPU ms":>9}{"binary MACs":>13}{"fp MACs":>11}'
          f'{"CPU ms at peak":>16}{"of peak":>9}', flush=True)

    def rows(table: dict) -> None:
        for kind, v in sorted(table.items(), key=lambda kv: -kv[1]['cpu_s']):
            frac = '-' if v['fraction'] is None else f'{100 * v["fraction"]:.1f}%'
            print(f'{"":11}{kind:<{width}}{v["seconds"] * 1e3:>9.2f}{v["cpu_s"] * 1e3:>9.2f}'
                  f'{v["binary_macs"]:>13.3g}{v["fp_macs"]:>11.3g}{v["ideal_cpu_s"] * 1e3:>16.3f}{frac:>9}', flush=True)

    rows(r['kinds'])
    if r.get('widths'):
        print(f'{"":11}binary convs by input channels:', flush=True)
        rows(r['widths'])
    if r['binary_fraction'] is not None:
        print(f'{"":11}all binary convs: {100 * r["binary_fraction"]:.1f}% of the popcount peak', flush=True)


def _mb(n: float) -> str:
    return f'{n / 1e6:.2f} MB'


# --------------------------------------------------------------------------- child: peak memory of one method


def _vm_kib(field: str) -> float:
    """A line of /proc/self/status in KiB (VmHWM: peak RSS of this program; unlike ru_maxrss it does not
    inherit the parent's peak across fork + exec)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return float(line.split()[1])
    return float('nan')


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    kind, path, batch, size = args.child_kind, args.child_path, args.child_batch, args.child_size
    if kind == 'pytorch':
        from bnas_nni.checkpoints import load_checkpoint_file, model_from_checkpoint

        model = model_from_checkpoint(load_checkpoint_file(path))
        run = lambda x: model(x)  # noqa: E731
    elif kind == 'packed':
        from bnas_nni.deploy import load

        net = load(path, isa=args.child_isa)
        run = lambda x: net(x)  # noqa: E731
    else:
        sess = ort_session(path, args.threads)
        run = lambda x: sess.run(None, {'images': x.numpy()})  # noqa: E731
    x = torch.randn(batch, 3, size, size)
    base = _vm_kib('VmRSS') / 1024
    with torch.no_grad():
        run(x)
    peak = _vm_kib('VmHWM') / 1024
    print('RESULT ' + json.dumps({'peak_mib': peak, 'loaded_mib': base}), flush=True)


def peak_memory(kind: str, path: str, batch: int, size: int, threads: int, isa: str = '') -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ['PYTHONPATH']]
                                                                       if os.environ.get('PYTHONPATH') else [])))
    cmd = [sys.executable, '-W', 'ignore', str(Path(__file__).resolve()), '--child-kind', kind, '--child-path', path,
           '--child-batch', str(batch), '--child-size', str(size), '--threads', str(threads),
           '--child-isa', isa or 'auto']
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'memory child {kind} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}')


# --------------------------------------------------------------------------- timing


def interleaved(methods: dict, repeats: int, budget: float, block: int = 1) -> dict:
    """Per method: median wall seconds, median process CPU seconds, best wall seconds and what the runs returned.

    Methods take turns run by run, so that load on the (shared) machine hits them alike; a method whose
    warm-up takes longer than ``budget`` seconds is timed by that one run. With ``block`` > 1 each turn is
    ``block`` consecutive runs of which the first is not timed: with spinning thread pools (``--spin``) the
    previous method's threads still spin at the start of a turn, and a method's steady state is what an
    application running it in a loop gets.
    """
    runs = {k: [] for k in methods}
    single = set()

    def once(k, f):
        t0, c0 = time.perf_counter(), time.process_time()
        value = f()
        runs[k].append((time.perf_counter() - t0, time.process_time() - c0, value))

    for k, f in methods.items():
        once(k, f)
        if runs[k][0][0] > budget:
            single.add(k)
        else:
            runs[k].clear()               # a warm-up, not a measurement
    for _ in range(repeats):
        for k, f in methods.items():
            if k not in single:
                if block > 1:
                    f()
                for _ in range(max(1, block - 1)):
                    once(k, f)
    return {k: {'median_s': statistics.median(r[0] for r in v), 'cpu_s': statistics.median(r[1] for r in v),
                'best_s': min(r[0] for r in v), 'runs': len(v), 'values': [r[2] for r in v]} for k, v in runs.items()}


class BinaryLayerHooks:
    """Summed time of the float model's binary ops in one forward: the modules the engine runs as packed binary
    convs, ``BN -> sign -> binary conv -> ReLU`` and the react block ``BN -> RSign -> binary conv [+ shortcut]
    -> (R)PReLU`` (timed whole, shortcut and nonlinearity included, as the engine's layer is)."""

    def __init__(self, model) -> None:
        from bnas_nni.deploy.export import SIGN_QUANTIZERS
        from bnas_nni.ops import BNConvReLU, ReActConv

        self.model, self.total, self.cpu, self.starts = model, 0.0, 0.0, {}
        self.modules = [m for m in model.modules() if type(m) in (BNConvReLU, ReActConv)
                        and SIGN_QUANTIZERS.get(type(m.quantizer)) == 'sign'
                        and getattr(m.op[0], 'weight_quantizer', None) is not None]

    def __call__(self, x) -> tuple:
        def pre(mod, inp):
            self.starts[id(mod)] = (time.perf_counter(), time.process_time())

        def post(mod, inp, out):
            t0, c0 = self.starts[id(mod)]
            self.total += time.perf_counter() - t0
            self.cpu += time.process_time() - c0

        hooks = [h for m in self.modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        self.total = self.cpu = 0.0
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return self.total, self.cpu


def engine_layers(net, x) -> dict:
    """Per-kind seconds of one profiled engine forward, the layer counts, and the binary layers' wall and CPU time."""
    _, records = net.profile(x, cpu=True)
    kinds, counts = {}, {}
    binary = binary_cpu = 0.0
    for _, kind, t, c in records:
        kinds[kind] = kinds.get(kind, 0.0) + t
        counts[kind] = counts.get(kind, 0) + 1
        if kind.startswith('binary conv'):
            binary += t
            binary_cpu += c
    return {'kinds': kinds, 'counts': counts, 'binary': binary, 'binary_cpu': binary_cpu}


# --------------------------------------------------------------------------- one network


def bench_config(config: str, args, workdir: Path) -> dict:
    import torch

    from bnas_nni import deploy
    from bnas_nni.checkpoints import save_checkpoint
    from bnas_nni.deploy.kernels import supported_isas

    model, size = build_trained(args.checkpoint) if config == 'checkpoint' else build(config)
    arch = (f"{model.genotype.name}, {model.family}, "
            f"C={model.cells[0].preprocess1.op[0].out_channels}, L={len(model.cells)}")
    ck = workdir / f'{config}.pt'
    save_checkpoint(model, ck)
    packed_path, onnx_path = workdir / f'{config}.bnp', workdir / f'{config}.onnx'
    sizes = deploy.export_packed(model, packed_path)
    sizes['onnx_bytes'] = deploy.export_onnx(model, onnx_path)['file_bytes']
    net = deploy.load(packed_path)
    sess = ort_session(str(onnx_path), args.threads)
    calibration, calib_source = dataset_images(args.calibration_images, size, train=True)
    int8_path = workdir / f'{config}.int8.onnx'
    quantize_onnx_int8(onnx_path, int8_path, calibration)
    sizes['onnx_int8_bytes'] = int8_path.stat().st_size
    sess8 = ort_session(str(int8_path), args.threads)
    isas = [i for i in ISAS_ORDER if i in supported_isas()]
    print(f'\n## {config} ({arch}, {size}x{size} images)', flush=True)
    print(f"sizes: fp32 state dict {_mb(sizes['fp32_state_dict_bytes'])} | packed file {_mb(sizes['file_bytes'])} "
          f"({sizes['fp32_state_dict_bytes'] / sizes['file_bytes']:.1f}x smaller) | binary part "
          f"{_mb(sizes['fp32_bytes'])} -> {_mb(sizes['packed_bytes'])} "
          f"({sizes['fp32_bytes'] / sizes['packed_bytes']:.1f}x "
          f"smaller, {sizes['binary_convs']} binary convs) | ONNX {_mb(sizes['onnx_bytes'])} | ONNX int8 "
          f"{_mb(sizes['onnx_int8_bytes'])}", flush=True)
    result = {'config': config, 'architecture': arch, 'image_size': size, 'sizes': sizes, 'batches': {}}
    held_out, held_source = dataset_images(args.agreement_images, size, train=False)
    net8 = None
    if args.fp_parts == 'int8':
        net8 = deploy.load(packed_path)
        net8.set_fp_parts('int8')
    runners = {f'packed {isas[0]}': lambda b: (net.set_isa(isas[0]), net(b))[1],
               'onnxruntime fp32': lambda b: sess.run(None, {'images': b.numpy()})[0],
               'onnxruntime int8': lambda b: sess8.run(None, {'images': b.numpy()})[0]}
    if net8 is not None:
        runners[f'packed {isas[0]} int8-fp'] = net8
    agree = top1_agreement(model, runners, held_out)
    classes = agree.pop('_classes')
    print(f'top-1 agreement with the float model on {len(held_out)} {held_source} (the float model predicts '
          f'{classes} distinct classes; int8 calibrated on {len(calibration)} {calib_source}): ' +
          ', '.join(f'{k} {100 * v:.1f}%' for k, v in agree.items()), flush=True)
    result['agreement'] = {'images': len(held_out), 'source': held_source, 'classes': classes, **agree}
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, size, size, generator=g)
        with torch.no_grad():
            ref = model(x)
        xn = x.numpy()

        def packed(isa):
            def f():
                net.set_isa(isa)
                return net(x)
            return f

        methods = {'pytorch fp32': lambda: model(x)}
        methods.update({f'packed {isa}': packed(isa) for isa in isas})
        if net8 is not None:
            methods[f'packed {isas[0]} int8-fp'] = lambda: net8(x)
        methods['onnxruntime fp32'] = lambda: sess.run(None, {'images': xn})
        methods['onnxruntime int8'] = lambda: sess8.run(None, {'images': xn})
        diffs = {'pytorch fp32': (0.0, 0)}
        for isa in isas:
            d = (packed(isa)() - ref).abs().amax(1)
            diffs[f'packed {isa}'] = (float(d.max()), int((d > 1e-4).sum()))
        if net8 is not None:
            d = (net8(x) - ref).abs().amax(1)
            diffs[f'packed {isas[0]} int8-fp'] = (float(d.max()), int((d > 1e-4).sum()))
        for k, se in (('onnxruntime fp32', sess), ('onnxruntime int8', sess8)):
            d = torch.from_numpy(se.run(None, {'images': xn})[0] - ref.numpy()).abs().amax(1)
            diffs[k] = (float(d.max()), int((d > 1e-4).sum()))
        best = isas[0]
        hooks = BinaryLayerHooks(model)
        probes = {'pytorch binary layers': lambda: hooks(x),
                  f'packed {best} layers': lambda: (net.set_isa(best), engine_layers(net, x))[1]}
        repeats = args.repeats if args.repeats is not None else (15 if batch == 1 else 5)
        with torch.no_grad():
            timing = interleaved({**methods, **probes}, repeats, args.budget, block=4 if SPIN else 1)
        probe_runs = {k: timing.pop(k) for k in probes}
        base, int8 = timing['pytorch fp32'], timing['onnxruntime int8']
        print(f'\nbatch {batch}: {"method":<26}{"median ms":>11}{"min ms":>9}{"img/s":>9}{"vs fp32":>9}'
              f'{"vs int8":>9}{"min/min":>9}{"CPU ms":>9}{"runs":>6}{"max |dlogit|":>14}{"imgs >1e-4":>11}',
              flush=True)
        for k, r in timing.items():
            r.pop('values')
            r['img_s'] = batch / r['median_s']
            r['speedup'] = base['median_s'] / r['median_s']
            r['speedup_best'] = base['best_s'] / r['best_s']
            r['speedup_cpu'] = base['cpu_s'] / r['cpu_s']
            r['vs_ort_int8'] = int8['median_s'] / r['median_s']
            r['vs_ort_int8_best'] = int8['best_s'] / r['best_s']
            r['max_logit_diff'], r['images_above_1e-4'] = diffs[k]
            print(f'{"":9}{k:<26}{r["median_s"] * 1e3:>11.2f}{r["best_s"] * 1e3:>9.2f}{r["img_s"]:>9.1f}'
                  f'{r["speedup"]:>8.2f}x{r["vs_ort_int8"]:>8.2f}x{r["vs_ort_int8_best"]:>8.2f}x'
                  f'{r["cpu_s"] * 1e3:>9.1f}{r["runs"]:>6}{diffs[k][0]:>14.1e}{diffs[k][1]:>8}/{batch}', flush=True)
        torch_runs = probe_runs['pytorch binary layers']['values']
        t_torch_bin = statistics.median(r[0] for r in torch_runs)
        c_torch_bin = statistics.median(r[1] for r in torch_runs)
        layer_runs = probe_runs[f'packed {best} layers']['values']
        t_eng_bin = statistics.median(r['binary'] for r in layer_runs)
        c_eng_bin = statistics.median(r['binary_cpu'] for r in layer_runs)
        kinds = {k: statistics.median(r['kinds'][k] for r in layer_runs) for k in layer_runs[0]['kinds']}
        counts = layer_runs[0]['counts']
        react = sum(type(m).__name__ == 'ReActConv' for m in hooks.modules)
        what = f'{len(hooks.modules)} layers' + (f', {react} react blocks with their shortcut and nonlinearity'
                                                 if react else '')
        print(f'{"":9}binary conv layers alone ({what}, medians of {len(layer_runs)} interleaved '
              f'runs): pytorch {t_torch_bin * 1e3:.2f} ms, packed {best} {t_eng_bin * 1e3:.2f} ms: '
              f'{t_torch_bin / t_eng_bin:.1f}x (CPU time {c_torch_bin * 1e3:.1f} vs {c_eng_bin * 1e3:.1f} ms: '
              f'{c_torch_bin / c_eng_bin:.1f}x)', flush=True)
        total = sum(kinds.values())
        print(f'{"":9}per-layer breakdown, packed {best} ({total * 1e3:.2f} ms in layers):', flush=True)
        for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f'{"":11}{kind:<34}{counts[kind]:>4} layers {t * 1e3:>10.2f} ms {100 * t / total:>6.1f}%', flush=True)
        roof = None
        if net.family == 'cifar' and not args.no_roofline:
            roof = roofline(net, x, best, isas, max(3, repeats // 2))
            print_roofline(roof, batch)
        result['batches'][batch] = {'timing': timing, 'roofline': roof,
                                    'binary_layers': {'pytorch_s': t_torch_bin, 'packed_s': t_eng_bin,
                                                      'pytorch_cpu_s': c_torch_bin, 'packed_cpu_s': c_eng_bin,
                                                      'isa': best},
                                    'breakdown': {k: {'seconds': v, 'layers': counts[k]} for k, v in kinds.items()}}
    if not args.no_memory:
        batch = max(args.batch)
        mem = {'pytorch fp32': peak_memory('pytorch', str(ck), batch, size, args.threads),
               f'packed {isas[0]}': peak_memory('packed', str(packed_path), batch, size, args.threads, isas[0]),
               'onnxruntime': peak_memory('onnx', str(onnx_path), batch, size, args.threads),
               'onnxruntime int8': peak_memory('onnx', str(int8_path), batch, size, args.threads)}
        base = mem['pytorch fp32']
        print(f'\npeak memory at batch {batch} (fresh process each; peak RSS (VmHWM), and its growth over the '
              'RSS with the model loaded):', flush=True)
        for k, m in mem.items():
            print(f'{"":9}{k:<18}{m["peak_mib"]:>9.0f} MiB  (+{m["peak_mib"] - m["loaded_mib"]:.0f} MiB; '
                  f'x{m["peak_mib"] / base["peak_mib"]:.2f} of fp32)', flush=True)
        result['memory'] = {'batch': batch, **mem}
    return result


def check_targets(results: list) -> None:
    a = next((r for r in results if r['config'] == 'bnas-a'), None)
    if a is None:
        return
    print('\n## targets (BNAS-A, 2 threads)', flush=True)
    lines = []
    for batch, key in ((1, 'b1'), (32, 'b32')):
        b = a['batches'].get(batch)
        if b:
            best = max((v['speedup'], k) for k, v in b['timing'].items()   # the bit-exact default only
                       if k.startswith('packed') and not k.endswith('int8-fp'))
            cpu = b['timing'][best[1]]['speedup_cpu']
            lines.append((f'packed engine vs fp32 at batch {batch} ({best[1]}; CPU time {cpu:.2f}x)', best[0],
                          TARGETS[key]))
            t = b['timing'][best[1]]
            lines.append((f'packed engine vs onnxruntime int8 at batch {batch} (medians; min/min '
                          f'{t["vs_ort_int8_best"]:.2f}x)', t['vs_ort_int8'], TARGETS['vs_int8']))
    for batch, b in a['batches'].items():
        bl = b['binary_layers']
        lines.append((f'binary conv layers alone at batch {batch} (CPU time '
                      f'{bl["pytorch_cpu_s"] / bl["packed_cpu_s"]:.2f}x)', bl['pytorch_s'] / bl['packed_s'],
                      TARGETS['binary_layers']))
    b = a['batches'].get(32)
    if b and b.get('roofline') and b['roofline'].get('binary_fraction') is not None:
        lines.append(('binary convs at batch 32, fraction of the popcount peak (1.00x = all of it)',
                      b['roofline']['binary_fraction'], TARGETS['roofline']))
    s = a['sizes']
    lines.append(('binary part of the file, fp32 / packed', s['fp32_bytes'] / s['packed_bytes'],
                  TARGETS['binary_part']))
    for label, value, target in lines:
        print(f'{label:<72}{value:>8.2f}x  (target >= {target:g}x)  {"met" if value >= target else "NOT met"}',
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument('--batch', type=int, nargs='+', default=None, help='batch sizes (default 1 32)')
    ap.add_argument('--threads', type=int, default=2, help='threads for PyTorch, the engine and onnxruntime')
    ap.add_argument('--repeats', type=int, default=None, help='timed runs per method (default 15 at batch 1, else 5)')
    ap.add_argument('--budget', type=float, default=20.0, help='a warm-up run longer than this (s) is the only run')
    ap.add_argument('--checkpoint', help='also bench this trained network (checkpoint file or run directory)')
    ap.add_argument('--fp-parts', choices=('float', 'int8'), default='float',
                    help="int8: also time the engine with its full-precision convs on int8 (fp_parts='int8', "
                         'not bit-exact) and report its top-1 agreement')
    ap.add_argument('--spin', action='store_true',
                    help="each runtime's default thread waiting (libgomp spins briefly, onnxruntime's workers spin) "
                         'instead of none spinning (OMP_WAIT_POLICY=PASSIVE, allow_spinning=0), methods in turns '
                         'of 4 runs; for a quiet machine')
    ap.add_argument('--no-memory', action='store_true', help='skip the peak-memory child processes')
    ap.add_argument('--no-roofline', action='store_true', help='skip the roofline (micro-benchmarks + profiles)')
    ap.add_argument('--calibration-images', type=int, default=64,
                    help='training images that calibrate the onnxruntime int8 model')
    ap.add_argument('--agreement-images', type=int, default=256,
                    help='held-out images for the top-1 agreement with the float model')
    ap.add_argument('--quick', action='store_true', help='smoke check: BNAS-A, batch 1 and 4, 3 repeats')
    ap.add_argument('--json', help='also write all results to this file')
    for name in ('kind', 'path', 'isa'):
        ap.add_argument(f'--child-{name}', help=argparse.SUPPRESS)
    for name in ('batch', 'size'):
        ap.add_argument(f'--child-{name}', type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.spin != SPIN:   # the thread policy is set at import, from the process's own command line
        ap.error('--spin must be on the command line of the process (it is read before any OpenMP runtime starts)')
    if args.child_kind:
        _child(args)
        return 0
    if args.quick:
        args.configs, args.batch = ['bnas-a'], args.batch or [1, 4]
        args.repeats = args.repeats or 3
    args.batch = args.batch or [1, 32]
    import torch

    torch.set_num_threads(args.threads)
    from bnas_nni.deploy.kernels import supported_isas

    print(f'# inference bench: {args.threads} threads (torch.get_num_threads()={torch.get_num_threads()}), '
          f'torch {torch.__version__}, engine paths {", ".join(supported_isas())}; medians of interleaved runs '
          'after a warm-up, all in this process; thread waiting: ' +
          ("each runtime's default (--spin)" if SPIN else
           f"none spins (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, onnxruntime allow_spinning=0)"),
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix='bnas-inference-') as tmp:
        for config in args.configs + (['checkpoint'] if args.checkpoint else []):
            results.append({**bench_config(config, args, Path(tmp)), 'spin': SPIN})
    check_targets(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
