"""EchoModel: the ECHO encoder with the released checkpoint's parameter names, and its reference
per-signal `encode` that follows the released behaviour step by step (spec sections 1-6)."""
from __future__ import annotations

import math
import numbers
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import geometry, inputs
from .ops import attention as attention_ops
from .ops import norm as norm_ops
from .ops import stft as stft_ops
from .ops import tokens as token_ops


def as_asked(device: torch.device):
    """Inference runs its products in the dtype the caller asked for: an autocast around the call (a serving
    stack's, a notebook's, a training loop's validation) would silently run float32's in bf16, 5e-5 to 2e-3 off."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type with no autocast (mps before torch 2.5): none to switch off
        return nullcontext()


@dataclass(frozen=True)
class EchoConfig:
    """An ECHO encoder's shape: width `dim`, `depth` layers of `heads` attention heads, MLP width mlp_ratio x dim.
    The defaults are ECHO-small's; EchoConfig.preset(size) or PRESETS holds each released size."""

    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-6  # inside every encoder layer (released value)
    final_norm_eps: float = 1e-6  # the final `norm`; some authors' snippets used torch's default 1e-5

    def __post_init__(self):
        """Sizes are whole numbers and eps finite and positive, whatever the config came from (a preset, a
        checkpoint's metadata, overrides): dim=192.0 failed deep in torch and eps=NaN made a NaN model. They are
        kept as plain int and float: a numpy scalar (heads=np.int64(3)) made echo.save fail, JSON has no such type."""
        sizes = {"dim": self.dim, "depth": self.depth, "heads": self.heads, "mlp_ratio": self.mlp_ratio}
        bad = [f"{name}={value!r}" for name, value in sizes.items()
               if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0]
        bad += [f"{name}={value!r}" for name, value in (("layer_norm_eps", self.layer_norm_eps),
                                                        ("final_norm_eps", self.final_norm_eps))
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf]
        if bad:
            raise ValueError(f"invalid ECHO config: {', '.join(bad)} (sizes are positive integers, eps finite "
                             f"and positive)")
        for name in sizes:  # frozen: set as dataclasses' own __init__ does
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("layer_norm_eps", "final_norm_eps"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.dim % 2 or self.dim % self.heads:
            raise ValueError(f"invalid ECHO config: dim={self.dim} must be even and divisible by heads={self.heads}")

    @classmethod
    def preset(cls, size: str, **overrides) -> "EchoConfig":
        """The config of a PRESETS size ("tiny", "small", "base", "large"), with fields replaced by `overrides`."""
        if not isinstance(size, str) or size not in PRESETS:  # a list is unhashable: no TypeError
            raise ValueError(f"unknown ECHO size {size!r}; known sizes: {', '.join(PRESETS)}")
        names = [field.name for field in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:  # the dataclass's own TypeError named one and not the fields there are
            raise TypeError(f"unknown EchoConfig field(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return replace(PRESETS[size], **overrides)

    @property
    def size(self) -> str | None:
        """The preset name this config matches in dim/depth/heads, or None for a custom one."""
        for name, preset in PRESETS.items():
            if (preset.dim, preset.depth, preset.heads) == (self.dim, self.depth, self.heads):
                return name
        return None

    def to_dict(self) -> dict:
        """The fields as a plain dict, as a checkpoint's metadata stores them (EchoConfig(**d) makes it again)."""
        return asdict(self)


PRESETS = {
    "tiny": EchoConfig(dim=192, depth=12, heads=3),
    "small": EchoConfig(dim=384, depth=12, heads=6),
    "base": EchoConfig(dim=768, depth=12, heads=12),
    "large": EchoConfig(dim=1024, depth=24, heads=16),
}


class SelfAttention(nn.Module):
    """Named like nn.MultiheadAttention so checkpoints load: packed in_proj (rows Q, K, V) + out_proj."""

    def __init__(self, dim: int, heads: int, **factory):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim, **factory))
        self.out_proj = nn.Linear(dim, dim, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D), every sequence attending only to itself."""
        q, k, v = attention_ops.split_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.heads)
        return self.out_proj(attention_ops.merge_heads(attention_ops.attention(q, k, v)))


class EchoLayer(nn.Module):
    """One post-norm layer, exactly nn.TransformerEncoderLayer(norm_first=False, activation='gelu')."""

    def __init__(self, config: EchoConfig, **factory):
        super().__init__()
        dim = config.dim
        self.self_attn = SelfAttention(dim, config.heads, **factory)
        self.linear1 = nn.Linear(dim, config.mlp_ratio * dim, **factory)
        self.linear2 = nn.Linear(config.mlp_ratio * dim, dim, **factory)
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = norm_ops.residual_layer_norm(x, self.self_attn(x), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        hidden = norm_ops.bias_gelu(F.linear(x, self.linear1.weight), self.linear1.bias)
        return norm_ops.residual_layer_norm(x, self.linear2(hidden), self.norm2.weight, self.norm2.bias, self.norm2.eps)


class Encoder(nn.Module):
    def __init__(self, config: EchoConfig, **factory):
        super().__init__()
        self.layers = nn.ModuleList(EchoLayer(config, **factory) for _ in range(config.depth))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, **factory):
        super().__init__()
        patch = (geometry.BAND_BINS, geometry.PATCH_FRAMES)
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch, **factory)


class EchoModel(nn.Module):
    """The ECHO encoder. `state_dict()` has exactly the released keys and shapes (spec section 7). Made on
    `device` in `dtype`, by default torch's default device and dtype, as nn.Linear is."""

    def __init__(self, config: EchoConfig | None = None, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        if config is not None and not isinstance(config, EchoConfig):  # "small" or a dict failed on a missing .dim
            raise TypeError(f"config must be an EchoConfig, e.g. EchoConfig.preset('small') or EchoConfig(**fields) "
                            f"(echo.load reads a checkpoint), got {type(config).__name__} {config!r:.60}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch dtype such as torch.float32, got {dtype!r}")
        if device is not None:  # a typo ("gpu") was torch's list of every device type it was built with
            device = inputs.checked_device(device, allow_meta=True)
        self.config = config or EchoConfig()
        dim = self.config.dim
        factory = {"device": device, "dtype": dtype}
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **factory))
        # Fixed sin/cos table, but stored in checkpoints: a frozen parameter, as released. Placed with the other
        # tensors: always made on the CPU in float32, it left a model made under a default GPU unable to encode.
        self.pos_embed = nn.Parameter(token_ops.time_position_table(dim).to(self.cls_token), requires_grad=False)
        self.patch_embed = PatchEmbed(dim, **factory)
        self.encoder = Encoder(self.config, **factory)
        self.norm = nn.LayerNorm(dim, eps=self.config.final_norm_eps, **factory)
        if not self.cls_token.is_meta:  # a meta tensor has no values; its normal_ imports torch._dynamo (~3 s of
            nn.init.normal_(self.cls_token, std=0.02)  # every echo.load, which shapes the model on the meta device)

    @property
    def device(self) -> torch.device:
        """Where the weights are, and so where encode runs."""
        return self.cls_token.device

    def band_tokens(self, bands: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, 32, T) band images with their FPE positions p (B,) -> (B, L+1, D) sequences [CLS, patches]."""
        patches = token_ops.patch_project(bands, self.patch_embed.proj.weight, self.patch_embed.proj.bias)
        fpe = token_ops.frequency_encoding(positions.to(bands.device), self.config.dim).to(patches.dtype)
        return token_ops.assemble_sequences(patches, self.cls_token, self.pos_embed, fpe)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, L+1, D) token sequences -> (B, L+1, D) final-normed outputs."""
        for layer in self.encoder.layers:
            sequences = layer(sequences)
        return self.norm(sequences)

    @torch.no_grad()
    def encode(self, waveform, sample_rate) -> tuple[torch.Tensor, torch.Tensor]:
        """One signal -> (utterance (nb*D,), frames (rows, nb*D)), float32 on the CPU.

        `waveform` is (N,) or (C, N) at its own integer rate; with C channels each is encoded on its own and
        the embeddings are concatenated along the feature axis (utterance C*nb*D, frames (rows, C*nb*D)).
        Signals over 2000 frames are cut into segments as released: utterance = mean of the segments',
        frames = the segments' rows stacked.
        """
        sample_rate = inputs.check_sample_rate(sample_rate)
        waveform = inputs.as_signal(waveform, sample_rate)
        if self.device.type == "meta":  # torch said "Cannot copy out of meta tensor", naming no model
            raise ValueError("the model is on the meta device: it has shapes but no weights; load its weights on a "
                             "device that computes (cpu, cuda, ...)")
        with as_asked(self.device):  # the model's own dtype: a training loop's validation runs under its autocast
            if waveform.dim() == 2:
                encoded = [self._encode_mono(channel, sample_rate) for channel in waveform]
                return torch.cat([u for u, _ in encoded]), torch.cat([f for _, f in encoded], dim=-1)
            return self._encode_mono(waveform, sample_rate)

    def _encode_mono(self, waveform: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The front end is float64 inside and float32 out; a model converted to another dtype reads it in its own.
        spec = stft_ops.spectrogram(waveform.to(self.device), sample_rate).to(self.cls_token.dtype)
        positions = token_ops.band_positions(sample_rate)
        utterances, frames = [], []
        for start, end in geometry.segments(spec.shape[-1]):
            bands = token_ops.band_split(spec[:, start:end], sample_rate)
            out = self(self.band_tokens(bands, positions))
            utterances.append(out[:, 0].flatten())
            frames.append(out[:, 1:].transpose(0, 1).flatten(1))
        utterance = torch.stack(utterances).mean(dim=0)
        return utterance.float().cpu(), torch.cat(frames).float().cpu()
