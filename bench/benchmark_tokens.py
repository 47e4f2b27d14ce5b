"""Token packing (band split + 32x16 patch projection + positions + CLS into the packed buffer) on the
spectrograms of W1 / W2, ECHO-small (D = 384): Triton fused vs one torch GEMM + gathers vs the reference.

    pytest bench/benchmark_tokens.py --benchmark-only -s
"""
import pytest
import torch

from echo.ops import stft as stft_ops
from echo.ops import tokens as token_ops

from .conftest import NO_GPU, ragged_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
DIM = 384


def costs(plan, dim: int = DIM, itemsize: int = 4) -> tuple[float, float]:
    """Bytes: every patch element read once (fp32), every token written once, the weight read once;
    FLOPs: the patch projection, 2 * 512 * D per patch."""
    patches = int(plan.seq_patches.sum())
    return 4 * 512 * patches + itemsize * (plan.total_tokens * dim + 512 * dim), 2 * 512 * dim * patches


@pytest.mark.parametrize("workload", ["W1", "W2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_pack_tokens(benchmark, measure, workload, dtype, backend):
    if backend == "reference" and dtype != torch.float32:
        pytest.skip("the reference runs in float32 only")
    waves, offsets, plan = ragged_inputs(workload)
    spec = stft_ops.ragged_spectrogram(waves, offsets, plan)
    weight = (torch.randn(DIM, 1, 32, 16, device="cuda") * 0.05).to(dtype)
    bias, cls_token = torch.randn(DIM, device="cuda").to(dtype), torch.randn(1, 1, DIM, device="cuda").to(dtype)
    pos_embed = token_ops.time_position_table(DIM).to("cuda", dtype)
    benchmark.group = f"tokens {workload} {dtype}"
    bytes_moved, flops = costs(plan, itemsize=weight.element_size())
    measure(lambda: token_ops.pack_tokens(spec, plan, weight, bias, cls_token, pos_embed, backend),
            bytes_moved, flops, dtype, label=f"tokens {workload} {str(dtype)[6:]} {backend}")
