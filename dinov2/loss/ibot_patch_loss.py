"""iBOT loss on masked patch tokens: the student predicts the teacher's prototype scores of masked patches."""
from typing import Optional

import torch
import torch.nn.functional as F

from ._dist import CenteredTeacherTargets, all_reduce_


class iBOTPatchLoss(CenteredTeacherTargets):
    """Masked-token cross-entropy, each masked patch weighted by 1/#masked patches of its image."""

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        masks_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss over the masked tokens only.

        student/teacher tokens are `(n_masked, K)` in the order of `student_masks_flat.flatten().nonzero()`;
        `student_masks_flat` is `(B, N)` bool; `masks_weight` `(n_masked,)` defaults to 1/#masked of each image.
        The sum is divided by B so images without masked patches still count in the average.
        """
        n_masked = int(student_masks_flat.sum())
        if student_patch_tokens_masked.shape[0] != n_masked or teacher_patch_tokens_masked.shape[0] != n_masked:
            raise ValueError(
                f"iBOT loss: {n_masked} masked patches but student has {student_patch_tokens_masked.shape[0]} "
                f"and teacher {teacher_patch_tokens_masked.shape[0]} tokens"
            )
        if masks_weight is None:
            per_img = 1.0 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_img.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        lsm = F.log_softmax(student_patch_tokens_masked.float() / self.student_temp, dim=-1)
        loss = torch.sum(teacher_patch_tokens_masked * lsm, dim=-1) * masks_weight.to(lsm.dtype)
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens_masked: torch.Tensor) -> None:
        """EMA update with the mean over all ranks' masked teacher tokens (skipped if none were masked)."""
        stats = torch.cat(
            [teacher_patch_tokens_masked.float().sum(0), teacher_patch_tokens_masked.new_tensor([teacher_patch_tokens_masked.shape[0]]).float()]
        )
        all_reduce_(stats)
        count = float(stats[-1])
        if count == 0:
            return
        batch_center = (stats[:-1] / count).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
