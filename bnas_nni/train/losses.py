r"""Training losses: what a recipe minimises, given the logits, the targets and the images.

* :class:`CrossEntropy`: cross entropy; with label smoothing :math:`\epsilon` the targets are
  :math:`(1-\epsilon)\,\text{onehot} + \epsilon / K` and the loss is the batch mean of the sum over
  classes, i.e. the official ``CrossEntropyLabelSmooth``.
* :class:`Distillation`: the distributional loss of ReActNet against the logits :math:`z^{t}` of a frozen
  real-valued teacher run on the same images (:func:`distribution_loss`).

ReActNet writes the distributional loss as the cross entropy
:math:`-\sum_k p^t_k \log p^s_k` (:math:`p = \mathrm{softmax}(z)`). We compute it minus the teacher's
entropy :math:`H(p^t) = -\sum_k p^t_k \log p^t_k`, i.e. the KL divergence
:math:`\sum_k p^t_k (\log p^t_k - \log p^s_k)`: the teacher is frozen, so :math:`H(p^t)` is a constant and
the gradient w.r.t. the student is the same (:math:`(p^s - p^t)/B` per logit), while the value is 0
exactly when the student's distribution equals the teacher's (a logged loss that reads as distance).

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
    r""":math:`\frac{1}{B}\sum_b\sum_k p^t_{bk}(\log p^t_{bk} - \log p^s_{bk})`: ReActNet's
    :math:`-\frac{1}{B}\sum_b\sum_k p^t_{bk}\log p^s_{bk}` minus the (constant) teacher entropy, so the same
    gradient and 0 for identical logits (see the module docstring). The teacher side is never differentiated."""
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
    log_s = F.log_softmax(student_logits.float(), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


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
