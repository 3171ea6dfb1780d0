"""DINO loss on CLS-token prototype scores, with centering or Sinkhorn-Knopp teacher targets."""
from typing import Sequence

import torch
import torch.nn.functional as F

from ._dist import CenteredTeacherTargets, all_reduce_, world_size


class DINOLoss(CenteredTeacherTargets):
    """Cross-entropy between (centred, sharpened) teacher softmax and student log-softmax.

    `center` is an EMA of the teacher's batch-mean scores, averaged over all ranks.
    """

    def forward(self, student_output_list: Sequence[torch.Tensor], teacher_targets_list: Sequence[torch.Tensor]):
        """Sum over every (student chunk, teacher chunk) pair of the mean cross-entropy."""
        total = 0.0
        for s in student_output_list:
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_targets_list:
                if t.shape != lsm.shape:
                    raise ValueError(f"DINO loss: teacher targets {tuple(t.shape)} vs student {tuple(lsm.shape)}")
                total = total - torch.sum(t * lsm, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA update of the center with the (all-rank) batch mean of the raw teacher scores."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        all_reduce_(batch_sum)
        batch_center = batch_sum / (teacher_output.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

