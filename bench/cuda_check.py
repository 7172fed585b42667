"""CUDA correctness and speed figures for the binary primitives and the derived networks.

Prints, for a CUDA device: the xnor/sign binarizers and the sign STE against the CPU (forward and
gradient), the search's fast cell against the straightforward cell on the device (one architecture step and
one weight step of a three-cell supernet: outputs, alpha, weight and input gradients, BN statistics),
BNAS-A and bnas-d logits CUDA vs CPU (eval, same weights), a binarization-aware training step
in fp32, bf16 autocast and channels-last (finite loss, latent weights constrained), and train/eval
throughput of BNAS-A (batch 256, the paper's) and bnas-d (batch 64). Exit status 1 if a check fails.

    python bench/cuda_check.py [--device cuda] [--steps 10]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from bnas_nni.networks import build_model
from bnas_nni.quant import attach_latent_constraint, make_activation, make_binarizer

FAILED: list = []


def check(name: str, ok: bool, detail: str = '') -> None:
    print(f'[{"ok" if ok else "FAIL"}] {name} {detail}')
    if not ok:
        FAILED.append(name)


def primitives(device: torch.device) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3) * 0.7
    g = torch.randn(32, 16, 3, 3)
    for name in ('xnor', 'sign'):
        b = make_binarizer(name)
        outs, grads = [], []
        for dev in (torch.device('cpu'), device):
            wd = w.detach().clone().to(dev).requires_grad_()
            out = b.binarize(wd)
            out.backward(g.to(dev))
            outs.append(out.detach().cpu()), grads.append(wd.grad.cpu())
        check(f'{name} binarizer forward cuda==cpu', torch.allclose(outs[0], outs[1], atol=1e-6),
              f'max|d|={float((outs[0] - outs[1]).abs().max()):.2e}')
        check(f'{name} binarizer grad cuda==cpu', torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4),
              f'max|d|={float((grads[0] - grads[1]).abs().max()):.2e}')
    x = torch.randn(4, 8, 5, 5) * 2
    act = make_activation('ste_sign')
    xs = [x.clone().to(d).requires_grad_() for d in (torch.device('cpu'), device)]
    for t in xs:
        act(t).sum().backward()
    check('ste_sign grad cuda==cpu', torch.equal(xs[0].grad, xs[1].grad.cpu()))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol_scale: float = 1e-4) -> bool:
    a, b = a.double().cpu(), b.double().cpu()
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol_scale * max(1.0, float(a.abs().max()))))


def fast_cell(device: torch.device) -> None:
    """FastBinaryMixedCell against BinaryMixedCell, both on ``device``: a normal and two reduction cells with
    every op, latent weights on a +-0.25 lattice (conv outputs are exact multiples of the XNOR scale, so ReLU
    ties fall alike whatever the summation order), one architecture step with the weights frozen and one
    weight step with the alphas frozen."""
    import warnings
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    from bnas_nni.search.binary_darts import BinaryDARTS, arch_parameters
    from bnas_nni.search.fast_cell import FastBinaryMixedCell
    from bnas_nni.search.mixed_cell import BinaryMixedCell
    from bnas_nni.space import BNASSpace

    ref, fast = (BinaryDARTS(mixed_cell=cls).mutate_model(BNASSpace(init_channels=4, layers=3, num_nodes=3))
                 for cls in (BinaryMixedCell, FastBinaryMixedCell))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if '_arch_alpha' in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 4 and p.shape[1] % 2 == 0:
                o, i, kh, kw = p.shape
                half = torch.randint(0, 2, (o, i // 2, kh, kw), generator=g).float() * 2 - 1
                p.copy_(torch.cat([half, -half], 1)[:, torch.randperm(i, generator=g)] * 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fast.load_state_dict(ref.state_dict())
    xv, xt = (torch.randn(4, 3, 16, 16, generator=g) for _ in range(2))
    yv, yt = (torch.randint(0, 10, (4,), generator=g) for _ in range(2))
    results = []
    for model in (ref, fast):
        model.to(device).train()
        alphas = arch_parameters(model)
        ids = {id(p) for p in alphas}
        weights = [p for p in model.parameters() if id(p) not in ids]
        for p in weights:
            p.requires_grad_(False)
        x = xv.clone().to(device).requires_grad_()  # a fresh leaf per model
        out_arch = model(x)
        F.cross_entropy(out_arch, yv.to(device)).backward()
        arch = ([a.grad.detach().clone() for a in alphas], x.grad.detach().clone())
        for p in weights:
            p.requires_grad_(True)
        for a in alphas:
            a.requires_grad_(False)
        out_weight = model(xt.to(device))
        F.cross_entropy(out_weight, yt.to(device)).backward()
        for a in alphas:
            a.requires_grad_(True)
        results.append({'arch-step output': [out_arch.detach()], 'alpha grads': arch[0], 'input grad': [arch[1]],
                        'weight-step output': [out_weight.detach()],
                        'weight grads': [p.grad for p in weights if p.grad is not None],
                        'BN statistics': [b for n, b in model.named_buffers() if 'running' in n]})
    for what, want in results[0].items():
        got = results[1][what]
        ok = len(got) == len(want) > 0 and all(_close(a, b) for a, b in zip(want, got))
        worst = max((float((a.double().cpu() - b.double().cpu()).abs().max()) for a, b in zip(want, got)),
                    default=float('nan'))
        check(f'fast cell == straightforward cell on {device.type}: {what}', ok, f'max|d|={worst:.2e}')


def logits(device: torch.device) -> None:
    for cfg, size, kw in (('bnas-a', 32, {}), ('bnas-d', 224, {})):
        torch.manual_seed(0)
        net = build_model(cfg, **kw).eval()
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            ref = net(x)
            out = net.to(device)(x.to(device)).cpu()
            out_cl = net.to(memory_format=torch.channels_last)(x.to(device).contiguous(
                memory_format=torch.channels_last)).cpu()
        # sign() turns round-off into flipped bits that propagate through every binary layer, so CUDA
        # and CPU agree only to a few percent of the logit scale, not to float precision
        scale = float(ref.abs().max())
        d = float((ref - out).abs().max())
        check(f'{cfg} logits cuda~cpu (rel. to max|logit|)', d < 0.1 * scale, f'max|d|={d:.2e} of {scale:.2e}')
        d = float((out - out_cl).abs().max())
        check(f'{cfg} channels-last ~ contiguous', d < 0.1 * scale, f'max|d|={d:.2e} of {scale:.2e}')
        del net


def train_step(device: torch.device, steps: int) -> None:
    for amp in (None, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        net = build_model('bnas-a').to(device).to(memory_format=torch.channels_last)
        # the one-cycle schedule starts at 2.5e-3; lr 0.05 from scratch diverges (see the README)
        opt = torch.optim.SGD(net.parameters(), lr=2.5e-3, momentum=0.9, weight_decay=3e-6)
        attach_latent_constraint(opt, net)
        scaler = torch.amp.GradScaler('cuda', enabled=amp is torch.float16)
        x = torch.randn(64, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (64,), device=device)
        losses = []
        for _ in range(steps):
            with torch.autocast('cuda', dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
        w = net.cells[1].ops[1].op[0].weight
        constrained = bool(w.abs().max() <= 1.0 + 1e-6)
        label = {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[amp]
        check(f'train step {label} finite and fitting', all(map(lambda v: v == v and v < 1e4, losses))
              and losses[-1] < losses[0], f'loss {losses[0]:.3f} -> {losses[-1]:.3f}')
        check(f'train step {label} latent weights in [-1, 1]', constrained)


def throughput(device: torch.device) -> None:
    for cfg, batch, size in (('bnas-a', 256, 32), ('bnas-d', 64, 224)):
        torch.manual_seed(0)
        net = build_model(cfg).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        attach_latent_constraint(opt, net)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, net.classifier.out_features, (batch,), device=device)
        torch.cuda.reset_peak_memory_stats(device)

        def step(net=net, opt=opt):
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            step()
        torch.cuda.synchronize(device)
        train_ips = n * batch / (time.perf_counter() - t)
        net.eval()
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            for _ in range(3):
                net(x)
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(n):
                net(x)
            torch.cuda.synchronize(device)
        eval_ips = n * batch / (time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f'{cfg}: train {train_ips:,.0f} img/s (bf16, channels-last, batch {batch}), '
              f'eval {eval_ips:,.0f} img/s, peak {peak:,.0f} MiB on {torch.cuda.get_device_name(device)}')
        del net, opt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--skip-throughput', action='store_true')
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != 'cuda' or not torch.cuda.is_available():
        print('no CUDA device: nothing to check')
        return 0
    torch.backends.cudnn.allow_tf32 = False  # compare full fp32 against the CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f'torch {torch.__version__} on {torch.cuda.get_device_name(device)}')
    primitives(device)
    fast_cell(device)
    logits(device)
    train_step(device, args.steps)
    if not args.skip_throughput:
        throughput(device)
    print(f'{len(FAILED)} failed: {FAILED}' if FAILED else 'all CUDA checks passed')
    return 1 if FAILED else 0


if __name__ == '__main__':
    sys.exit(main())
