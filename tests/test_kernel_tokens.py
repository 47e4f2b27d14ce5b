"""The Triton token packing (echo_kernels/tokens.py) against the reference."""
import re

import pytest
import torch

from echo import geometry
from echo.ops import tokens as token_ops
from echo.plan import make_plan

from conftest import assert_flash_rule, rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM = 64


def samples_for(frames: int, rate: int) -> int:
    return geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate)


def random_parameters(dim: int = DIM, dtype=torch.float32):
    weight = torch.randn(dim, 1, geometry.BAND_BINS, geometry.PATCH_FRAMES) * 0.05
    bias, cls_token = torch.randn(dim) * 0.1, torch.randn(1, 1, dim)
    return [t.to(DEVICE, dtype) for t in (weight, bias, cls_token, token_ops.time_position_table(dim))]


def case(frames, rates):
    plan = make_plan([samples_for(t, sr) for t, sr in zip(frames, rates)], rates)
    spec = torch.randn(int(plan.spec_offsets[-1])).to(DEVICE)
    return spec, plan


def test_mixed_rates_and_patch_edges(poisoned_empty):
    # 1 frame (one patch, mostly time padding), 16 frames (one whole patch), 512 frames = 32 patches (one
    # tile exactly), 513 frames (one tile + 1), and random lengths, at mixed rates (4 to 9 bands)
    frames = [1, 16, 512, 513, int(torch.randint(1, 200, ()))]
    spec, plan = case(frames, [8000, 12000, 8000, 22050, 16000])
    params = random_parameters()
    got = token_ops.pack_tokens(spec, plan, *params, backend="triton")
    assert got.shape == (plan.total_tokens, DIM) and not got.isnan().any()
    ref = token_ops.pack_tokens_reference(spec.cpu(), plan, *[p.cpu() for p in params])
    assert rel_err(got.cpu(), ref) < 1e-5


def test_segments_of_a_long_signal(poisoned_empty):
    """Over 2000 frames: two segments, the second the last 2000 frames (overlapping the first)."""
    spec, plan = case([2000 + int(torch.randint(1, 300, ()))], [8000])
    assert len(plan.segments) == 2
    params = random_parameters()
    got = token_ops.pack_tokens(spec, plan, *params, backend="triton")
    ref = token_ops.pack_tokens_reference(spec.cpu(), plan, *[p.cpu() for p in params])
    assert not got.isnan().any() and rel_err(got.cpu(), ref) < 1e-5


def test_bf16_weights_flash_rule():
    spec, plan = case([int(torch.randint(1, 100, ())), 40], [16000, 12000])
    params = random_parameters()
    low = [p.bfloat16() for p in params]
    got = token_ops.pack_tokens(spec, plan, *low, backend="triton")
    assert got.dtype == torch.bfloat16
    cpu_spec = spec.cpu()
    exact = token_ops.pack_tokens_reference(cpu_spec.double(), plan, *[p.cpu().double() for p in low])
    same_dtype = token_ops.pack_tokens_torch(cpu_spec, plan, *[p.cpu() for p in low])
    assert_flash_rule(got.cpu(), same_dtype, exact, 2)


def test_empty_batch():
    spec, plan = case([], [])
    got = token_ops.pack_tokens(spec, plan, *random_parameters(), backend="triton")
    assert got.shape == (0, DIM)


def test_strided_spectrogram_buffer():
    """A spectrogram buffer that is a strided view is read as its values, not as the base's (relative error 0.5)."""
    spec, plan = case([33, 5], [16000, 8000])
    strided = torch.stack([spec, torch.randn_like(spec)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, spec)
    params = random_parameters()
    got = token_ops.pack_tokens(strided, plan, *params, backend="triton")
    ref = token_ops.pack_tokens_reference(spec.cpu(), plan, *[p.cpu() for p in params])
    assert rel_err(got.cpu(), ref) < 1e-5


def test_strided_positions_are_read_as_their_values(monkeypatch):
    """A caller's strided view of the frequency positions was read as the base's elements (error ~2)."""
    from echo_kernels import tokens as kernel

    spec, plan = case([33, 5], [16000, 8000])
    params = random_parameters()
    launch = kernel.pack_tokens

    def strided_positions(*args, positions, **kwargs):
        view = torch.stack([positions, torch.randn_like(positions)], dim=1).reshape(-1)[::2]
        assert not view.is_contiguous() and torch.equal(view, positions)
        return launch(*args, positions=view, **kwargs)

    monkeypatch.setattr(kernel, "pack_tokens", strided_positions)
    got = token_ops.pack_tokens(spec, plan, *params, backend="triton")
    ref = token_ops.pack_tokens_reference(spec.cpu(), plan, *[p.cpu() for p in params])
    assert rel_err(got.cpu(), ref) < 1e-5


@pytest.mark.parametrize("change", ["rows past the last sequence", "rows short of the last sequence", "one offset more"])
def test_cu_seqlens_that_disagree_with_the_patches_are_refused(change, monkeypatch):
    """The output has cu_seqlens[-1] rows and sequence s is written at cu_seqlens[s] for patches[s] + 1 rows: extra
    rows came back unwritten (garbage), too few were written past the buffer's end (a crash)."""
    from echo_kernels import tokens as kernel

    spec, plan = case([33, 5], [16000, 8000])
    launch = kernel.pack_tokens
    altered = {"rows past the last sequence": lambda cu: torch.cat([cu[:-1], cu[-1:] + 4]),
               "rows short of the last sequence": lambda cu: torch.cat([cu[:-1], cu[-1:] - 2]),
               "one offset more": lambda cu: torch.cat([cu, cu[-1:] + 1])}[change]
    monkeypatch.setattr(kernel, "pack_tokens", lambda *args, cu_seqlens, **kwargs: launch(
        *args, cu_seqlens=altered(cu_seqlens), **kwargs))
    with pytest.raises(ValueError, match=r"cu_seqlens must step by patches \+ 1"):
        token_ops.pack_tokens(spec, plan, *random_parameters(), backend="triton")



@pytest.mark.parametrize("change, message", [
    ("image past the spectrogram", r"sequence \d+: frames 0-\d+ of an image .* must lie inside its rows and the \d+ "),
    ("frames past the image's row", r"sequence 0: frames 0-6 of an image of 32 rows of 5 frames at offset \d+ must lie"),
    ("positions of one sequence", "need one value per sequence, got image_offsets 11, .* positions 1"),
])
def test_images_outside_the_spectrogram_are_refused(change, message, monkeypatch):
    """Called directly, the kernel read each sequence's image at its offset unchecked: outside the spectrogram it
    returned NaN or other memory's values, and a per-sequence tensor shorter than the sequences was read past its
    end."""
    from echo_kernels import tokens as kernel

    spec, plan = case([33, 5], [16000, 8000])
    launch = kernel.pack_tokens
    altered = {"image past the spectrogram": ("image_offsets", lambda offsets: offsets + len(spec) // 2),
               "frames past the image's row": ("frames", lambda frames: frames + 1),
               "positions of one sequence": ("positions", lambda positions: positions[:1])}[change]

    def pack(*args, **kwargs):
        name, alter = altered
        return launch(*args, **kwargs | {name: alter(kwargs[name])})

    monkeypatch.setattr(kernel, "pack_tokens", pack)
    with pytest.raises(ValueError, match=message):
        token_ops.pack_tokens(spec, plan, *random_parameters(), backend="triton")


@pytest.mark.parametrize("which", ["bias", "cls_token", "pos_embed"])
def test_parameters_of_another_shape_are_refused(which):
    """A narrow bias or CLS, or a position table with fewer rows than the longest sequence's patches, were read past
    their end (plausible but wrong tokens); the torch path raises for each."""
    spec, plan = case([33, 5], [16000, 8000])
    weight, bias, cls_token, pos_embed = random_parameters()
    short = {"bias": bias[:10], "cls_token": cls_token[..., :10], "pos_embed": pos_embed[:, :2]}
    params = dict(weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed) | {which: short[which]}
    with pytest.raises(ValueError, match=rf"{which} {re.escape(str(tuple(short[which].shape)))} must hold"):
        token_ops.pack_tokens(spec, plan, *params.values(), backend="triton")


@pytest.mark.parametrize("bins", [300, 100])
def test_band_split_refuses_a_spectrogram_of_another_rate(bins):
    """16 kHz has 201 bins: 300 rows were cut silently (the last band taken from rows 268-299), 100 failed in a
    reshape."""
    with pytest.raises(ValueError, match=f"16000 Hz has 201 frequency bins, got a spectrogram of shape \\({bins}, 10\\)"):
        token_ops.band_split(torch.randn(bins, 10), 16000)
