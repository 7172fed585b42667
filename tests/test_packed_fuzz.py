"""A bounded fuzz run over packed files: no signal, no raw exception, no nondeterministic output.

300 variants of two small exported networks (see ``packed_fuzz.corpus``): truncations, byte flips in the
header and in tensor data, and signed edits of every kind of header field and of tensor bytes. Each is
loaded and, when accepted, run twice at batch 1 and 2 on every instruction-set path in a worker
subprocess, so that a crash shows up as a signal for that file. bench/fuzz_packed.py runs the same corpus
(larger, if asked) on the engine built with AddressSanitizer and UBSan.
"""
from __future__ import annotations

from collections import Counter

from packed_fuzz import run_corpus, tiny_packed_files, write_corpus

VARIANTS_PER_NETWORK = 150


def test_fuzzed_packed_files_never_crash_leak_exceptions_or_vary(tmp_path):
    bases = tiny_packed_files(tmp_path / 'base')
    files = write_corpus(bases, tmp_path / 'corpus', VARIANTS_PER_NETWORK, seed=0)
    results = run_corpus(files, timeout=300)
    assert [r['file'] for r in results] == [str(f) for f in files]
    counts = Counter(r['result'] for r in results)
    bad = [r for r in results if r['result'] not in ('ok', 'refused')]
    assert not bad, (counts, bad[:10])
    refusals = [r['detail'] for r in results if r['result'] == 'refused']
    assert all('\n' not in d and 're-export' in d for d in refusals), [d for d in refusals if 're-export' not in d][:5]
    # the corpus reaches every layer of defence, and edits that keep a valid network still run
    assert any('not a complete safetensors file' in d for d in refusals)
    assert any('checksum mismatch' in d for d in refusals)
    assert sum('cells[' in d for d in refusals) >= 50
    assert counts['ok'] >= 20 and counts['refused'] >= 200, counts
