r"""Training losses: what a recipe minimises, given the logits, the targets and the images.

* :class:`CrossEntropy`: cross entropy; with label smoothing :math:`\epsilon` the targets are
  :math:`(1-\epsilon)\,\text{onehot} + \epsilon / K` and the loss is the batch mean of the sum over
  classes, i.e. the official ``CrossEntropyLabelSmooth``.
* :class:`Distillation`: the distributional loss of ReActNet,
  :math:`-\sum_k \mathrm{softmax}(z^{t})_k \log\mathrm{softmax}(z^{s})_k` averaged over the batch, with
  the logits :math:`z^{t}` of a frozen real-valued teacher run on the same images.

Losses take ``(logits, target, images)`` so a teacher can see the batch; they are modules so that a
teacher moves with ``.to(device)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['TrainLoss', 'CrossEntropy', 'Distillation', 'distribution_loss']


class TrainLoss(nn.Module):
    """``forward(logits, target, images) -> scalar loss``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(TrainLoss):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=float(label_smoothing or 0.0))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor = None) -> torch.Tensor:
        return self.ce(logits, target)


def distribution_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    r""":math:`-\frac{1}{B}\sum_b\sum_k \mathrm{softmax}(z^t_b)_k \log\mathrm{softmax}(z^s_b)_k`."""
    target = F.softmax(teacher_logits.float(), dim=1)
    return -(target * F.log_softmax(student_logits.float(), dim=1)).sum(dim=1).mean()


class Distillation(TrainLoss):
    """Distributional loss against a frozen teacher (kept in eval mode, no gradients)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> 'Distillation':
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return distribution_loss(logits, teacher_logits)
