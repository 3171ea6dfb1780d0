"""Student/teacher meta-architecture: DINO (CLS), iBOT (masked patches) and KoLeo losses, EMA teacher.

Global crops go through the teacher; global and local crops (different sizes and channel counts) go through the
student backbone in one multi-crop call. Runs on CPU or CUDA with plain torch (no xformers).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from dinov2 import fsdp as dp
from dinov2.layers import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import build_model_from_cfg
from dinov2.utils.dtype import PrecisionPolicy, precision_policy
from dinov2.utils.param_groups import get_param_groups

logger = logging.getLogger("dinov2")

_CROP_KEYS = ("imgs", "chn_ids", "spec_masks")


def _to_device(crops: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in crops.items() if k in _CROP_KEYS and torch.is_tensor(v)}


def _unsupported(cfg) -> None:
    """Options of the published config that reference code paths PanopticonPE never had."""
    if float((cfg.get("pe_distil") or {}).get("loss_weight", 0.0) or 0.0) > 0:
        raise ValueError("pe_distil.loss_weight > 0 is not supported (no distillation target in PanopticonPE)")
    if bool((cfg.get("aux_loss") or {}).get("enable", False)):
        raise ValueError("aux_loss.enable is not supported (PanopticonPE has no auxiliary gating losses)")
    if (cfg.get("optim") or {}).get("repa"):
        raise ValueError("optim.repa is not supported")
    teacher_w = (cfg.get("teacher") or {}).get("pretrained_weights")
    if teacher_w and teacher_w != "same_as_student":
        raise ValueError("teacher.pretrained_weights is not used: the teacher starts as a copy of the student; "
                         "load weights with MODEL.pretrained_weights (prefix_map '' -> 'teacher.backbone.') instead")


def _load_student_weights(backbone: nn.Module, entries) -> None:
    """`student.pretrained_weights` entries (as `dinov2.utils.checkpoint.load_pretrained_weights` takes them)
    applied to the student backbone."""
    from dinov2.utils.checkpoint import load_pretrained_weights

    if hasattr(entries, "_metadata"):  # OmegaConf container
        from omegaconf import OmegaConf

        entries = OmegaConf.to_container(entries, resolve=True)
    missing, unexpected = load_pretrained_weights(backbone, list(entries))
    logger.info("student.pretrained_weights: %d missing, %d unexpected keys", len(missing), len(unexpected))


class SSLMetaArch(nn.Module):
    """`student`/`teacher` ModuleDicts with `backbone`, `dino_head` and (if `ibot.separate_head`) `ibot_head`."""

    def __init__(self, cfg):
        super().__init__()
        _unsupported(cfg)
        self.cfg = cfg
        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        if cfg.student.get("pretrained_weights"):
            _load_student_weights(student_backbone, cfg.student.pretrained_weights)
        self.embed_dim = embed_dim
        self.do_dino = float(cfg.dino.loss_weight) > 0
        self.do_koleo = float(cfg.dino.koleo_loss_weight) > 0
        self.do_ibot = float(cfg.ibot.loss_weight) > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.centering = str(cfg.train.centering)
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"train.centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        self.grad_accum = max(1, int(cfg.get("gradient_accumulation_steps", 1) or 1))

        def dino_head():
            return DINOHead(embed_dim, int(cfg.dino.head_n_prototypes), nlayers=int(cfg.dino.head_nlayers),
                            hidden_dim=int(cfg.dino.head_hidden_dim), bottleneck_dim=int(cfg.dino.head_bottleneck_dim))

        def ibot_head():
            return DINOHead(embed_dim, int(cfg.ibot.head_n_prototypes), nlayers=int(cfg.ibot.head_nlayers),
                            hidden_dim=int(cfg.ibot.head_hidden_dim), bottleneck_dim=int(cfg.ibot.head_bottleneck_dim))

        student = {"backbone": student_backbone, "dino_head": dino_head()}
        teacher = {"backbone": teacher_backbone, "dino_head": dino_head()}
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"], teacher["ibot_head"] = ibot_head(), ibot_head()
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False

        self.dino_loss = DINOLoss(int(cfg.dino.head_n_prototypes))
        ibot_dim = int(cfg.ibot.head_n_prototypes) if self.ibot_separate_head else int(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()
        # forward entry points of the student modules (DDP wrappers after prepare_for_distributed_training);
        # a plain dict so the wrappers never appear in state_dict()
        self._student_fwd: Dict[str, nn.Module] = dict(self.student.items())
        self.precision = PrecisionPolicy("cpu", None, False)
        self.fp16_scaler: Optional[torch.amp.GradScaler] = None
        logger.info("SSLMetaArch: dino=%s ibot=%s (separate head %s) koleo=%s, embed_dim %d", self.do_dino,
                    self.do_ibot, self.ibot_separate_head, self.do_koleo, embed_dim)

    # ------------------------------------------------------------------------------------------- set-up
    @property
    def device(self) -> torch.device:
        return self.student.backbone.cls_token.device

    def configure_precision(self, device: torch.device) -> PrecisionPolicy:
        """Autocast dtype from `compute_precision.dtype`; a GradScaler only for fp16 on CUDA."""
        cp = self.cfg.compute_precision
        self.precision = precision_policy(device, cp.get("dtype", "fp16"), bool(cp.get("grad_scaler", True)))
        self.fp16_scaler = torch.amp.GradScaler("cuda") if self.precision.use_grad_scaler else None
        return self.precision

    def prepare_for_distributed_training(self, mode: str = "ddp", allow_cpu_fsdp: bool = False) -> None:
        """Copy student -> teacher and wrap the student modules (DDP, or FSDP2 shards for student and teacher)."""
        mode = dp.check_mode(mode, allow_cpu=allow_cpu_fsdp)
        device = self.device
        if mode == "fsdp":
            dp.broadcast_from_rank0(self.student)
            self.teacher.load_state_dict(self.student.state_dict())
            mp = self.precision.autocast_dtype
            for k in self.student.keys():
                dp.shard_fsdp(self.student[k], mp)
                dp.shard_fsdp(self.teacher[k], mp)
            self._student_fwd = dict(self.student.items())
            return
        self._student_fwd = {k: dp.wrap_ddp(m, device) for k, m in self.student.items()}  # DDP syncs rank-0 weights
        self.teacher.load_state_dict(self.student.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        return self

    def get_params_groups(self) -> List[dict]:
        """Optimiser groups over all student modules, names prefixed by the module key."""
        o = self.cfg.optim
        named = [(f"{k}.{n}", p) for k, m in self.student.items() for n, p in m.named_parameters()]
        return get_param_groups(named, n_blocks=int(self.student.backbone.n_blocks),
                                layerwise_decay=float(o.layerwise_decay), lr_multiplier=o.get("lr_multiplier", ""),
                                freeze_weights=o.get("freeze_weights", ""))

    # ------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_targets(self, global_crops: Dict[str, torch.Tensor], mask_indices: torch.Tensor, teacher_temp: float):
        """Teacher DINO targets for the (swapped) global crops and iBOT targets for the masked patches."""
        out = self.teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"]
        a, b = cls.chunk(2)
        cls = torch.cat((b, a))  # crop A's target is matched with crop B's student output and vice versa
        n_cls = cls.shape[0]
        masked = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices) if self.do_ibot else None
        if self.do_ibot and not self.ibot_separate_head:
            both = self.teacher.dino_head(torch.cat((cls, masked)))
            cls_h, masked_h = both[:n_cls], both[n_cls:]
        else:
            cls_h = self.teacher.dino_head(cls)
            masked_h = self.teacher.ibot_head(masked) if self.do_ibot else None
        if self.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_h, teacher_temp)
            self.dino_loss.update_center(cls_h)
            ibot_t = None
            if self.do_ibot:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(masked_h, teacher_temp)
                self.ibot_patch_loss.update_center(masked_h)
        else:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_h, teacher_temp)
            ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(masked_h, teacher_temp) if self.do_ibot else None
        return dino_t, ibot_t

    # ------------------------------------------------------------------------------------------ student
    def forward_backward(self, batch: dict, teacher_temp: float) -> Dict[str, torch.Tensor]:
        """One micro-batch: losses, backward (scaled by 1/grad_accum and the fp16 scaler); returns detached
        per-term losses (keys `dino_local_crops_loss`, `dino_global_crops_loss`, `koleo_loss`, `ibot_loss`,
        `total_loss`)."""
        device = self.device
        g = _to_device(batch["collated_global_crops"], device)
        loc = _to_device(batch.get("collated_local_crops") or {}, device)
        masks = batch["collated_masks"].to(device, non_blocking=True)
        mask_indices = batch["mask_indices_list"].to(device, non_blocking=True)
        masks_weight = batch["masks_weight"].to(device, non_blocking=True)
        n_g_imgs = g["imgs"].shape[0]
        if n_g_imgs % 2:
            raise ValueError(f"expected 2 global crops per sample (crop-major), got {n_g_imgs} global images")
        bsz = n_g_imgs // 2
        n_local = loc["imgs"].shape[0] // bsz if "imgs" in loc else 0
        if masks.shape[0] != n_g_imgs:
            raise ValueError(f"collated_masks has {masks.shape[0]} rows for {n_g_imgs} global crops")

        with self.precision.autocast():
            dino_t, ibot_t = self.teacher_targets(g, mask_indices, teacher_temp)
            inputs, in_masks = [g], [masks]
            if n_local:
                inputs.append(loc)
                in_masks.append(None)
            outs = self._student_fwd["backbone"](inputs, masks=in_masks, is_training=True)
            s_g_cls = outs[0]["x_norm_clstoken"]
            s_l_cls = outs[1]["x_norm_clstoken"] if n_local else s_g_cls[:0]
            s_masked = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            # one head call over [local cls, global cls, (masked patches)] keeps the DDP graph to one forward
            head_in = [s_l_cls, s_g_cls] + ([s_masked] if self.do_ibot and not self.ibot_separate_head else [])
            head_out = self._student_fwd["dino_head"](torch.cat(head_in))
            n_l, n_gc = s_l_cls.shape[0], s_g_cls.shape[0]
            s_l_h, s_g_h = head_out[:n_l], head_out[n_l:n_l + n_gc]
            if self.do_ibot:
                s_masked_h = head_out[n_l + n_gc:] if not self.ibot_separate_head else self._student_fwd["ibot_head"](s_masked)

        n_global_terms = 2 * 1
        n_local_terms = n_local * 2
        norm = n_global_terms + n_local_terms
        zero = head_out.new_zeros(()).float()
        losses = {}
        total = zero
        if self.do_dino:
            teacher_chunks = list(dino_t.chunk(2))
            local_loss = self.dino_loss(list(s_l_h.chunk(n_local)), teacher_chunks) / norm if n_local else zero
            global_loss = self.dino_loss([s_g_h], [dino_t]) * 2 / norm
            losses["dino_local_crops_loss"] = local_loss
            losses["dino_global_crops_loss"] = global_loss
            total = total + float(self.cfg.dino.loss_weight) * (local_loss + global_loss)
        if self.do_koleo:
            koleo = float(self.cfg.dino.koleo_loss_weight) * sum(self.koleo_loss(p) for p in s_g_cls.chunk(2))
            losses["koleo_loss"] = koleo / 2
            total = total + koleo
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(s_masked_h, ibot_t, masks, masks_weight) if mask_indices.numel() \
                else s_masked_h.sum() * 0.0  # keeps the iBOT head in the graph when no patch is masked
            ibot = ibot * 2 * 0.5
            losses["ibot_loss"] = ibot / 2
            total = total + float(self.cfg.ibot.loss_weight) * ibot

        scaled = total / self.grad_accum
        if self.fp16_scaler is not None:
            self.fp16_scaler.scale(scaled).backward()
        else:
            scaled.backward()
        losses["total_loss"] = total
        return {k: v.detach() for k, v in losses.items()}

    def clip_gradients(self, max_norm: float) -> Dict[str, float]:
        """Clip each student module's gradient norm separately (after unscaling); returns the pre-clip norms."""
        norms = {}
        for k, m in self.student.items():
            params = [p for p in m.parameters() if p.grad is not None]
            if not params:
                continue
            n = nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(n, "full_tensor"):
                n = n.full_tensor()
            norms[k] = float(n)
        return norms

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, parameter by parameter (local shards under FSDP).

        Gradient accumulation (k = `gradient_accumulation_steps`) differs from the published loop on purpose: that
        loop divides the loss by k and steps the optimizer every k-th micro-batch, each micro-batch being an
        iteration of its schedules. Here one iteration is one optimizer step over k micro-batches: the schedules
        (lr, wd, momentum, teacher temperature) advance once per step and this EMA runs once per step, after it,
        with that step's momentum (an EMA after every micro-batch would pull the teacher k times towards the same
        student weights, i.e. momentum m^k per step). The teacher centers are updated per micro-batch."""
        for k in self.student.keys():
            s = [dp.local_tensor(p.detach()) for p in self.student[k].parameters()]
            t = [dp.local_tensor(p.detach()) for p in self.teacher[k].parameters()]
            if len(s) != len(t):
                raise RuntimeError(f"student/teacher {k} have {len(s)} vs {len(t)} parameters")
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1 - momentum)
