#!/usr/bin/env python
"""Fuzz the packed-file reader and the C++ engine, optionally built with AddressSanitizer and UBSan.

Runs the corpus of tests/test_packed_fuzz.py (truncations, byte flips, signed edits of every kind of header
field and of tensor bytes; see tests/packed_fuzz.py), the crafted files of tests/test_packed_validation.py
and the direct calls of the C++ entry points with bad arguments, each file in a worker subprocess, and
prints how each ended: ``ok`` (ran, same logits twice, batch 1 and 2, every instruction set), ``refused``
(one line), or a failure (``raw`` exception, ``nondeterministic``, ``signal``, ``exit`` -- with
``--sanitize`` a sanitizer report ends the worker with a non-zero status --, ``timeout``).

With ``--sanitize`` the engine is compiled with ``-fsanitize=address,undefined`` under its own extension
name (``bnas_nni_deploy_sanitized``) in its own cache folder (``--extensions-dir``), so the normal build is
never replaced; python itself is not instrumented, so the workers run with ``LD_PRELOAD`` of g++'s
``libasan.so`` and ``ASAN_OPTIONS=detect_leaks=0``. The first run compiles it (a few minutes).

Examples::

    python bench/fuzz_packed.py                          # 300 variants on the normal build (as CI)
    python bench/fuzz_packed.py --sanitize               # the same under ASan + UBSan
    python bench/fuzz_packed.py --sanitize --variants 1000 --seed 3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))

FAILURES = ('raw', 'nondeterministic', 'signal', 'exit', 'timeout')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sanitize', action='store_true', help='use the engine built with ASan + UBSan')
    parser.add_argument('--variants', type=int, default=300, help='fuzzed files in all, half per network (300)')
    parser.add_argument('--seed', type=int, default=0)
    default_dir = os.path.join(tempfile.gettempdir(), 'bnas_nni_sanitized_extensions')
    parser.add_argument('--extensions-dir', default=default_dir,
                        help='TORCH_EXTENSIONS_DIR of the sanitized build (default: %(default)s)')
    args = parser.parse_args()
    if args.sanitize:
        os.environ['TORCH_EXTENSIONS_DIR'] = args.extensions_dir

    import packed_fuzz as pf

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        bases = pf.tiny_packed_files(tmp_path / 'base')
        if args.sanitize:   # compile once before the timed runs (the workers would each wait for it)
            t0 = time.perf_counter()
            proc = pf.run_entry_points(bases['cifar'], sanitized=True, timeout=1800)
            print(f'sanitized engine ready in {time.perf_counter() - t0:.0f} s '
                  f'(TORCH_EXTENSIONS_DIR={args.extensions_dir})')
        else:
            proc = pf.run_entry_points(bases['cifar'])
        lines = proc.stdout.strip().splitlines()
        ok = proc.returncode == 0 and len(lines) == 12 and all(': RuntimeError: ' in line for line in lines)
        failed += not ok
        print(f"C++ entry points with bad arguments: {sum(': RuntimeError: ' in ln for ln in lines)}/12 raised "
              f'RuntimeError, worker exit status {proc.returncode}' + ('' if ok else '  FAILED'))
        if not ok:
            print('\n'.join(lines + proc.stderr.strip().splitlines()[-20:]))

        crafted = [pf.crafted_file(bases['cifar'], name, tmp_path) for name in pf.CASES]
        files = pf.write_corpus(bases, tmp_path / 'corpus', max(1, args.variants // 2), seed=args.seed)
        groups = {'untouched files': list(bases.values()), 'crafted files (regression cases)': crafted,
                  'fuzzed files': files}
        for title, group in groups.items():
            t0 = time.perf_counter()
            results = pf.run_corpus(group, sanitized=args.sanitize, timeout=1800)
            counts = Counter(r['result'] for r in results)
            bad = [r for r in results if r['result'] in FAILURES or '\n' in r['detail']]
            failed += len(bad)
            summary = ', '.join(f'{k} {v}' for k, v in sorted(counts.items()))
            print(f'{title}: {len(results)} in {time.perf_counter() - t0:.0f} s: {summary}'
                  + (f'  FAILED: {len(bad)}' if bad else ''))
            for r in bad[:20]:
                print(f"  {r['result']}: {Path(r['file']).name}: {r['detail'][:400]}")
    print(f"{'sanitized' if args.sanitize else 'normal'} engine: "
          + ('no failures' if not failed else f'{failed} FAILURES'))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
