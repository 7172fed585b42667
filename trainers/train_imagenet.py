"""BNAS-D..H ImageNet trainer:
`torchrun --nproc_per_node N trainers/train_imagenet.py --config experiments/train_imagenet_bnas.yaml [flags]`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

from bnas_nni.train.cli import train_main  # noqa: E402

if __name__ == '__main__':
    sys.exit(train_main(prog='train_imagenet.py', defaults={'dataset': 'imagenet'}))
