"""BNAS-A CIFAR-10 trainer:
`python trainers/train_cifar10.py --config experiments/train_cifar10_bnas_a.yaml [flags]`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from bnas_nni.train.cli import train_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(train_main(prog='train_cifar10.py'))
