"""All-reduce helpers for the losses that are no-ops without an initialised process group."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def dist_on() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) `t` in place across ranks when distributed is initialised; returns `t`."""
    if dist_on():
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t


def world_size() -> int:
    return dist.get_world_size() if dist_on() else 1


def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_samples: torch.Tensor, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp normalisation of teacher logits `(n, K)` into soft assignments with equal prototype mass.

    `n_samples` is this rank's number of rows as a tensor; it is summed over ranks so every rank works on its
    share of one global transport problem.
    """
    logits = logits.float() / temp
    # subtracting one global constant keeps exp() finite without changing the normalised result
    gmax = logits.max().detach().clone() if logits.numel() else logits.new_tensor(0.0)
    all_reduce_(gmax, op=dist.ReduceOp.MAX if dist_on() else None)
    q = torch.exp(logits - gmax).t()  # (K, n)
    n_total = all_reduce_(n_samples.detach().clone().float())
    k = q.shape[0]
    q /= all_reduce_(q.sum())
    for _ in range(n_iterations):
        # clamps: with extreme logits whole rows/columns can underflow to 0 and must not become NaN
        row_sum = all_reduce_(q.sum(dim=1, keepdim=True))
        q /= row_sum.clamp_min(1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= n_total
    q *= n_total
    return q.t()


class CenteredTeacherTargets(nn.Module):
    """Shared part of the DINO and iBOT losses: student temperature, teacher center and target builders."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher targets `(n, K)` with the current center subtracted (centering mode)."""
        return F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3):
        """Teacher targets balanced over prototypes by Sinkhorn-Knopp over all ranks (sinkhorn_knopp mode)."""
        n = torch.tensor(float(teacher_output.shape[0]), device=teacher_output.device)
        return sinkhorn_knopp(teacher_output, teacher_temp, n, n_iterations)
