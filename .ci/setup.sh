#!/usr/bin/env bash
# Everything bnas-nni needs on a fresh Debian machine with Python 3.11: the embedded default dataset
# (Debian's dataset-fashion-mnist), the package with its pinned dependencies, test tools and the 20 real
# CIFAR-10 / ImageNet images shipped inside foolbox 3.3.4 (used by tests only, installed without deps).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
$PY -m pip install -q --disable-pip-version-check --no-deps foolbox==3.3.4
