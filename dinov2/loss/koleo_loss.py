"""KoLeo regulariser: pushes L2-normalised features apart via the log distance to the nearest neighbour."""
import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator loss, `-mean(log(d_nn + eps))` (Sablayrolles et al. 2018)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.pdist = nn.PairwiseDistance(2, eps=eps)

    @staticmethod
    def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest other row of `x` (rows are unit vectors, so max inner product)."""
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine, so a row never picks itself
        return dots.argmax(dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features` `(B, D)` with B >= 2."""
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs a (B>=2, D) batch of features, got shape {tuple(features.shape)}")
        device_type = features.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                idx = self.nearest_neighbours(x)
            distances = self.pdist(x, x[idx])
            return -torch.log(distances + self.eps).mean()
