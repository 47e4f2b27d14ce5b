"""How learning rate and teacher EMA decay move with the step (spec section 8), and the EMA update itself."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CosineSchedule:
    """Linear warm-up to `peak` over `warmup` steps, then cosine down to `minimum` at step `total`.
    Called with the 0-based optimizer step; a LambdaLR of this object saves it in its state dict."""

    peak: float
    minimum: float
    warmup: int
    total: int

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.minimum + (self.peak - self.minimum) * 0.5 * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        """The LambdaLR factor (optimizer groups are built with lr = peak)."""
        return self.lr(step) / self.peak


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Rises linearly from `start` to `end` over `anneal_steps`, then stays."""
    return end if step >= anneal_steps else start + (end - start) * step / anneal_steps


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for every trained parameter (frozen ones such as
    pos_embed stay equal in both). Parameters are the whole state: the encoder has no buffers."""
    pairs = [(t, s) for t, s in zip(teacher.parameters(), student.parameters()) if s.requires_grad]
    torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], 1.0 - decay)
