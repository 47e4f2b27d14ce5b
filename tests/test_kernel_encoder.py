"""A whole encoder pass with every Triton kernel (front end, tokens, attention, norms) equals the reference
model's per-signal encode, on a tiny config (interpreter on the CPU, the GPU when there is one)."""
import pytest
import torch

from echo import geometry, packed
from echo.ops import stft as stft_ops
from echo.ops import tokens as token_ops
from echo.plan import make_plan

from conftest import random_model, rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_encoder_equals_reference_encode(poisoned_empty):
    model = random_model("tiny", dim=128, depth=2, heads=2)
    rates = [8000, 12000, 8000]
    # sequence lengths 2 (one patch), 3 and a random few, at two rates in one batch
    frames = [int(torch.randint(1, 17, ())), 20, int(torch.randint(1, 70, ()))]
    lengths = [geometry.n_fft(sr) + (t - 1) * geometry.hop(sr) for t, sr in zip(frames, rates)]
    signals = [torch.randn(n) * 0.1 for n in lengths]
    plan = make_plan(lengths, rates)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)

    device_model = model.to(DEVICE)
    proj = device_model.patch_embed.proj
    with torch.no_grad():
        spec = stft_ops.ragged_spectrogram(torch.cat(signals).to(DEVICE), offsets, plan, backend="triton")
        tokens = token_ops.pack_tokens(
            spec, plan, proj.weight, proj.bias, device_model.cls_token, device_model.pos_embed, backend="triton"
        )
        packing = packed.Packing.from_lengths(plan.seq_patches + 1, device=DEVICE)
        out = packed.forward(device_model, tokens, packing, backend="triton").cpu()
    assert not out.isnan().any()

    cls_rows = plan.cls_rows()
    model = model.cpu()
    for i, (signal, sr) in enumerate(zip(signals, rates)):
        utterance, frame_rows = model.encode(signal, sr)
        mine = cls_rows[plan.seq_signal == i]
        assert rel_err(out[mine].flatten(), utterance) < 1e-5
        patch_rows = torch.cat([torch.arange(r + 1, r + 1 + plan.seq_patches[s]) for s, r in
                                zip((plan.seq_signal == i).nonzero().squeeze(1).tolist(), mine.tolist())])
        got_frames = out[patch_rows].view(plan.bands[i], -1, model.config.dim).transpose(0, 1).flatten(1)
        assert rel_err(got_frames, frame_rows) < 1e-5
