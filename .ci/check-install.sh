#!/usr/bin/env bash
# A non-editable `pip install .` into a fresh venv, used from another directory: summary, a quick search
# a quick train and a packed export (the engine's and the fused search ops' C++ sources are package data) work with nothing but the installed package (search spaces and genotypes are package
# data). Takes a few minutes (the venv installs torch). Not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT   # the venv holds a full torch install (~6 GB): never leave it behind
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check .
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"
B="$WORK/venv/bin/bnas-nni"
"$B" summary bnas-a | tail -3
"$B" search --space bnas-tiny --dataset fashion-mnist --epochs 1 --set train_subset=256 --set image_size=16 --save mycell
# the fused search ops build from package data too
"$WORK/venv/bin/python" -c "from bnas_nni.search.fast_cell import kernels; assert kernels.fused_ops() is not None, 'no fused ops'"
"$B" train --arch mycell --dataset fashion-mnist --init-channels 8 --layers 3 --epochs 1 --train-subset 512 \
  --val-subset 256 --batch-size 64 --set lr=0.02 --set run_dir=trained | tail -2
"$B" export --checkpoint trained --out mycell.bnp | tail -2      # builds the C++ engine from package data
echo "install check passed"
