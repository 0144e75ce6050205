"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation with no labels: a student and a teacher of the same architecture (a timm
backbone + the DINO head: a 3-layer MLP to a bottleneck, L2 normalisation, and a
weight-normalised linear layer with unit norm per output, no bias) see different crops of each
image. Multi-crop: two *global* crops (scale 0.4–1, training size) go to the teacher and the
student; ``local_crops`` *local* crops (scale 0.05–0.4, about 0.43× the size: 96 px for 224 px)
go to the student only. The teacher's output is centred (minus an EMA of its batch means,
momentum 0.9) and sharpened (temperature 0.04, optionally warmed up to 0.07); the student's is
softened with temperature 0.1; the loss is the cross-entropy ``H(P_t(x), P_s(x'))`` averaged over
every pair of a teacher global view ``x`` and a *different* student view ``x'``.

The teacher gets no gradient: its parameters are an exponential moving average of the student's,
with a momentum that follows a cosine from ``momentum`` (0.996 on the GPU preset) to 1 over
training, applied in :meth:`DINO.after_step`; the centre is updated there too. The CPU preset
starts the momentum at 0.99 instead: with 0.996 and a few hundred steps the teacher would stay
close to its random initialisation. The last layer of the head is frozen for the first
``freeze_last_steps`` steps, as DINO does for its first epoch.

ViT backbones get ``dynamic_img_size=True`` (timm interpolates the position embeddings), so the
same network encodes global and local crops. The exported model is the teacher backbone, as DINO
evaluates it; its feature is the timm model's pooled output (the class token for ViTs).
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from retbench.pretrain.recipe import Preset, Recipe, color_jitter, flip, random_resized_crop
from retbench.pretrain.recipes.simclr import gaussian_blur, solarize

VIT_CPU = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8, "depth": 6, "dynamic_img_size": True}}
VIT_GPU = {"timm": "vit_small_patch16_224", "kwargs": {"img_size": 224, "dynamic_img_size": True, "drop_path_rate": 0.1}}
LOCAL_FRACTION = 96 / 224  # DINO's local crop size relative to its global crop size


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2-normalised, then a weight-normalised linear layer (unit-norm rows, no bias)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        # weight normalisation with the gain fixed at 1: only the direction of each output's weight vector is learnt
        self.last_direction = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_direction, std=0.02)

    def forward(self, x: torch.Tensor, freeze_last: bool = False) -> torch.Tensor:
        """Logits (B × out_dim); ``freeze_last`` stops the gradient into the last layer."""
        h = F.normalize(self.mlp(x), dim=-1)
        w = self.last_direction.detach() if freeze_last else self.last_direction
        return F.linear(h, F.normalize(w, dim=1))


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """Mean of ``H(softmax((t_i − c) / τ_t), softmax(s_j / τ_s))`` over pairs with j ≠ i.

    ``teacher[i]`` is the teacher's output on global view i, ``student[j]`` the student's on view j,
    with the global views first (``student[i]`` and ``teacher[i]`` are the same crop). Each term is
    averaged over the batch; pairs of a view with itself are left out.
    """
    targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1).detach() for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    total: torch.Tensor | float = 0.0
    terms = 0
    for i, p in enumerate(targets):
        for j, log_q in enumerate(log_probs):
            if j == i:
                continue
            total = total + (-(p * log_q).sum(-1)).mean()
            terms += 1
    return cast(torch.Tensor, total / terms)  # a tensor: there are at least two views, so at least one term


def updated_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """``m · c + (1 − m) · mean of the teacher's outputs over the batch`` (all global views together)."""
    batch_mean = torch.cat([t.detach().float() for t in teacher]).mean(0, keepdim=True)
    return center * momentum + batch_mean * (1 - momentum)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m · θ_t + (1 − m) · θ_s`` for every parameter and floating buffer (e.g. BatchNorm statistics)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        if bt.is_floating_point():
            bt.mul_(momentum).add_(bs, alpha=1 - momentum)
        else:
            bt.copy_(bs)


def teacher_momentum(step: int, total: int, base: float) -> float:
    """Cosine schedule from ``base`` at step 0 towards 1 at ``total``."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up of the teacher temperature from ``start`` to ``end`` over ``warmup_steps``, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "pos_embed")


class DINO(Recipe):
    """Self-distillation of a timm backbone into an EMA teacher with multi-crop views."""

    name = "dino"
    description = ("DINO (Caron et al. 2021): student and EMA teacher with a DINO head, multi-crop (2 global crops for "
                   "the teacher, global + local crops for the student), centred and sharpened teacher targets, "
                   "cross-entropy between different views; exports the teacher backbone.")
    presets = {
        "cpu": Preset(image_size=64, steps=200, batch_size=32, lr=5e-4, vision=VIT_CPU, weight_decay=0.04,
                      extra={"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256, "local_crops": 4,
                             "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "student_temp": 0.1,
                             "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "warmup_teacher_frac": 0.0,
                             "center_momentum": 0.9, "momentum": 0.99, "freeze_last_steps": 10}),
        "gpu": Preset(image_size=224, steps=20000, batch_size=256, lr=5e-4, vision=VIT_GPU, weight_decay=0.04,
                      amp=True, warmup_frac=0.05,
                      extra={"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "local_crops": 6,
                             "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "student_temp": 0.1,
                             "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_frac": 0.1,
                             "center_momentum": 0.9, "momentum": 0.996, "freeze_last_steps": 200}),
    }

    teacher_center: torch.Tensor  # buffers registered in __init__
    steps_done: torch.Tensor

    def __init__(self, settings: Any, data: Any) -> None:
        super().__init__(settings, data)
        import timm

        name, kwargs = settings.vision["timm"], dict(settings.vision.get("kwargs", {}))
        probe: Any  # a timm model: typed Any, as timm.create_model returns a plain nn.Module
        try:  # ViTs: interpolate the position embeddings, since local crops are smaller than the global grid
            probe = timm.create_model(name, num_classes=0, **{"dynamic_img_size": True, **kwargs})
            kwargs = {"dynamic_img_size": True, **kwargs}
        except TypeError:  # CNNs (and models without the option) take any input size as they are
            probe = timm.create_model(name, num_classes=0, **kwargs)
        self.vision_cfg = {"timm": settings.vision["timm"], "kwargs": kwargs}
        e = settings.extra
        self.student = probe
        self.student_head = DINOHead(probe.num_features, int(e["out_dim"]), int(e["hidden_dim"]), int(e["bottleneck_dim"]))
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in (*self.teacher.parameters(), *self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("teacher_center", torch.zeros(1, int(e["out_dim"])))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._batch_teacher: list[torch.Tensor] | None = None
        unit = probe.patch_embed.patch_size[0] if _is_vit(probe) else 1
        size = settings.image_size
        self.local_size = max(unit, round(size * LOCAL_FRACTION / unit) * unit)

    def train(self, mode: bool = True) -> DINO:
        """Student modules follow ``mode``; the teacher always runs in eval mode (no drop-path)."""
        super().train(mode)
        self.teacher.eval()
        self.teacher_head.eval()
        return self

    def teacher_temp(self, step: int) -> float:
        """The teacher temperature at ``step`` (warm-up, then constant)."""
        e = self.settings.extra
        warm = int(float(e.get("warmup_teacher_frac", 0.0)) * self.settings.steps)
        return teacher_temperature(step, warm, float(e["warmup_teacher_temp"]), float(e["teacher_temp"]))

    def crops(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Two global views (DINO's asymmetric blur / solarisation) and the local views, normalised."""
        e = self.settings.extra
        size, g_scale, l_scale = self.settings.image_size, tuple(e["global_scale"]), tuple(e["local_scale"])

        def view(out: int, scale: tuple[float, float], blur_p: float, solar_p: float) -> torch.Tensor:
            v = color_jitter(flip(random_resized_crop(x, out, scale=scale)), strength=0.4, p=0.8, grey_p=0.2)
            return self.normalize(solarize(gaussian_blur(v, blur_p), solar_p))

        globals_ = [view(size, g_scale, 1.0, 0.0), view(size, g_scale, 0.1, 0.2)]
        locals_ = [view(self.local_size, l_scale, 0.5, 0.0) for _ in range(int(e["local_crops"]))]
        return globals_, locals_

    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the student on every view against the centred, sharpened teacher on the other global view(s)."""
        e = self.settings.extra
        step = int(self.steps_done)
        globals_, locals_ = self.crops(self.pixels(indices))
        freeze = step < int(e.get("freeze_last_steps", 0))
        student = list(self.student_head(self.student(torch.cat(globals_)), freeze).chunk(len(globals_)))
        if locals_:
            student += list(self.student_head(self.student(torch.cat(locals_)), freeze).chunk(len(locals_)))
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher(torch.cat(globals_))).chunk(len(globals_)))
        t_temp = self.teacher_temp(step)
        loss = dino_loss(student, teacher, self.teacher_center, t_temp, float(e["student_temp"]))
        self._batch_teacher = [t.detach() for t in teacher]
        with torch.no_grad():
            p = F.softmax((torch.cat(teacher).float() - self.teacher_center) / t_temp, dim=-1)
            entropy = -(p * p.clamp(min=1e-12).log()).sum(-1).mean()
        return {"loss": loss, "teacher_entropy": entropy}

    def after_step(self, step: int) -> None:
        """EMA of the teacher (cosine momentum) and of the centre, from the batch just trained on."""
        e = self.settings.extra
        m = teacher_momentum(step, self.settings.steps, float(e["momentum"]))
        ema_update(self.teacher, self.student, m)
        ema_update(self.teacher_head, self.student_head, m)
        if self._batch_teacher is not None:
            self.teacher_center.copy_(updated_center(self.teacher_center, self._batch_teacher, float(e["center_momentum"])))
            self._batch_teacher = None
        self.steps_done.fill_(step + 1)

    def export(self) -> dict[str, Any]:
        """The teacher backbone (DINO evaluates the teacher), with ``dynamic_img_size`` in its config for ViTs."""
        return {"vision": self.teacher, "vision_cfg": self.vision_cfg}


RECIPE = DINO
