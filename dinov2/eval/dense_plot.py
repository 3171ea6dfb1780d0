"""Figures of segmentation tasks: image, target and predicted masks of a few test samples."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def _display_rgb(x: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, H, W, 3)`` in [0, 1]: the bands nearest 664 / 559 / 492 nm (or the first band as grey), 2-98 %
    stretched per band."""
    ids = x["chn_ids"][0]
    ids = ids[..., 0] if ids.ndim == 2 else ids
    idx = [int((ids.float() - w).abs().argmin()) for w in (664.0, 559.0, 492.0)] if (ids > 0).any() else [0, 0, 0]
    rgb = x["imgs"][:, idx].float()
    lo = torch.quantile(rgb.flatten(2), 0.02, dim=-1)[..., None, None]
    hi = torch.quantile(rgb.flatten(2), 0.98, dim=-1)[..., None, None]
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def plot_predictions(path: Path, probe, head: str, loader, n: int = 4,
                     class_names: Optional[Sequence[str]] = None) -> None:
    """Figure of the first ``n`` samples of ``loader``: image, target mask, predicted mask (head ``head``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    x, y = next(iter(loader))
    x, y = {k: v[:n] for k, v in x.items()}, y[:n]
    probe.heads.eval()
    pred = probe._forward({k: v.to(probe.dev) for k, v in x.items()}, tuple(y.shape[-2:]))[head].argmax(1).cpu()
    k = probe.num_classes
    colours = plt.get_cmap("tab10" if k <= 10 else "tab20")(range(k))
    cmap = ListedColormap(list(colours) + [(0.6, 0.6, 0.6, 1.0)])  # last colour: ignored pixels
    show = lambda m: torch.where(m == probe.ignore_index, torch.full_like(m, k), m)  # noqa: E731
    rgb = _display_rgb(x)
    fig, axes = plt.subplots(len(y), 3, figsize=(7.5, 2.5 * len(y)), squeeze=False)
    for i in range(len(y)):
        for ax, img, title in zip(axes[i], (rgb[i], show(y[i]), show(pred[i])), ("image", "target", "prediction")):
            ax.imshow(img, cmap=None if img.ndim == 3 else cmap, vmin=0, vmax=k, interpolation="nearest")
            ax.set_title(title if i == 0 else "")
            ax.axis("off")
    if class_names:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=colours[c], label=str(nm)) for c, nm in enumerate(class_names)],
                   loc="lower center", ncol=min(len(class_names), 5))
    fig.suptitle(f"test samples, head {head}")
    fig.tight_layout(rect=(0, 0.05 if class_names else 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
