#!/usr/bin/env bash
# The README's main job: a quick BNAS search -> train -> evaluate on the embedded Fashion-MNIST data
# (Debian dataset-fashion-mnist, padded to 32x32x3), a few minutes on 2 CPU cores.
#   bash experiments/quickstart.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
echo "== 1/3 search: BinaryDARTS on a tiny supernet  (run dir $RUN/search)"
bnas-nni search --config experiments/search_quick_fashion.yaml --run-dir "$RUN/search" --save quickstart --out "$RUN"
echo "== 2/3 train the derived cell from scratch  (run dir $RUN/train)"
bnas-nni train --config experiments/train_quick_fashion.yaml --arch "$RUN/quickstart.yaml" --run-dir "$RUN/train"
echo "== 3/3 evaluate the trained checkpoint on the 10,000 test images"
bnas-nni eval --config experiments/train_quick_fashion.yaml --arch "$RUN/quickstart.yaml" \
  --checkpoint "$RUN/train" --val-subset 10000
echo "genotype: $RUN/quickstart.yaml (ImageNet variant: $RUN/quickstart_imagenet.yaml)"
