"""The post-norm glue on the packed tokens of W1 / W2, ECHO-small (D = 384, MLP 1536): residual + LayerNorm
and bias + GELU, forward and forward + backward, Triton fused vs the torch reference (eager).

    pytest bench/benchmark_norm.py --benchmark-only -s
"""
import pytest
import torch

from echo.ops import norm as norm_ops

from .conftest import NO_GPU, workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
DIM = 384


def tokens(name: str) -> int:
    from echo.plan import make_plan

    signals, rates = workload(name)
    return make_plan([len(s) for s in signals], rates).total_tokens


def costs(op: str, rows: int, itemsize: int, backward: bool) -> tuple[float, float]:
    """Minimal traffic: LayerNorm reads x and residual, writes y (backward also reads dy, writes one dx:
    the two input gradients are the same tensor); bias + GELU on the 4D-wide hidden reads x, writes y
    (backward reads x and dy, writes dx). FLOPs are negligible (memory-bound)."""
    width = DIM if op == "layer_norm" else 4 * DIM
    passes = {("layer_norm", False): 3, ("layer_norm", True): 3 + 4, ("gelu", False): 2, ("gelu", True): 2 + 3}
    return itemsize * rows * width * passes[(op, backward)], 0.0


@pytest.mark.parametrize("workload_name", ["W1", "W2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("op", ["layer_norm", "gelu"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_norm(benchmark, measure, workload_name, dtype, backward, op, backend):
    rows = tokens(workload_name)
    width = DIM if op == "layer_norm" else 4 * DIM
    x = torch.randn(rows, width, device="cuda").to(dtype).requires_grad_(backward)
    grad = torch.randn(rows, width, device="cuda").to(dtype)
    if op == "layer_norm":
        residual = torch.randn(rows, width, device="cuda").to(dtype)
        # LayerNorm parameters in the input dtype: torch's layer_norm takes no mixed dtypes
        weight = torch.randn(width, device="cuda").to(dtype)
        bias = torch.randn(width, device="cuda").to(dtype)

        def forward():
            return norm_ops.fused_residual_layer_norm(x, residual, weight, bias, 1e-6, backend)
    else:
        bias = torch.randn(width, device="cuda").to(dtype)

        def forward():
            if backend == "triton":
                from echo_kernels import norm as kernel

                return kernel.bias_gelu(x, bias)
            return norm_ops.bias_gelu(x, bias)

    def step():
        out = forward()
        if backward:
            torch.autograd.grad(out, x, grad)

    benchmark.group = f"{op} {workload_name} {dtype} {'fwd+bwd' if backward else 'fwd'}"
    bytes_moved, flops = costs(op, rows, x.element_size(), backward)
    measure(step, bytes_moved, flops, dtype,
            label=f"{op} {workload_name} {str(dtype)[6:]} {'fwd+bwd' if backward else 'fwd'} {backend}")
