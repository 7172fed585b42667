#!/usr/bin/env bash
# Everything bnas-nni needs on a fresh Debian machine with Python 3.11: the embedded default dataset
# (Debian's dataset-fashion-mnist), graphviz for cell pictures, the package with its pinned dependencies,
# test tools (headless Chromium, tmux), the documentation tools (the `docs` extra: mkdocs-material,
# mkdocstrings) and the 20 real CIFAR-10 / ImageNet images shipped inside foolbox 3.3.4 (used by tests
# only, installed without deps).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# Debian packages: the embedded dataset; graphviz (`dot`, for `bnas-nni plot`); headless Chromium and a
# font for the web-UI browser test; tmux for the terminal-output test
APT_PACKAGES="dataset-fashion-mnist graphviz chromium fonts-dejavu-core tmux"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check -e ".[test,docs]"
$PY -m pip install -q --disable-pip-version-check --no-deps foolbox==3.3.4
