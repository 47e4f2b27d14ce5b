"""The CPU inference ops of a bf16 encode against the torch ops they replace, one ECHO-small layer's shapes
(4096 packed tokens, D = 384, 6 heads of 64). Prints median milliseconds and the ratio torch / echo (> 1: the
echo op is faster), after checking both against float64:

- products: echo.ops.linear.PackedLinear (oneDNN, weight packed once, GELU fused) vs F.linear (+ F.gelu), bf16
  and float32;
- norm: torch.ops.echo.residual_layer_norm (add + LayerNorm + bf16 copy in one pass) vs add, layer_norm, cast;
- attention: echo's CPU attention (the FMA kernel torch.ops.echo.short_attention, in bf16 with AMX the tile
  kernel torch.ops.echo.tile_attention from TILE_FROM tokens) vs SDPA grouped by length, sequences of L tokens
  filling 4096 rows; then the tile kernel against the FMA kernel, the A/B behind TILE_FROM.

End to end, `python bench/encode_throughput.py` compares fast-bf16 and fast-fp32 with fast-*-eager (these ops off).
Run: python bench/cpu_inference_ops.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from csrc_frontend import median_seconds  # bench/csrc_frontend.py
from encode_throughput import machine_peak
from echo import extension
from echo.ops import attention as attention_ops
from echo.ops import linear as linear_ops
from echo.packed import Packing

TOKENS, DIM, HEADS, HIDDEN = 4096, 384, 6, 1536
# (inputs, outputs, GELU) of an ECHO-small layer's products: qkv, attention output, MLP in, MLP out
LAYER_PRODUCTS = ((DIM, 3 * DIM, False), (DIM, DIM, False), (DIM, HIDDEN, True), (HIDDEN, DIM, False))


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.double() - truth).norm() / truth.norm()).item()


def compare(label: str, echo_fn, torch_fn, truth: torch.Tensor, tolerance: float, repeats: int) -> float | None:
    """Prints the row; returns the echo op's median seconds, None when it is off the float64 result."""
    errors = [rel_err(fn(), truth) for fn in (echo_fn, torch_fn)]
    if errors[0] > max(tolerance, 1.5 * errors[1]):
        print(f"{label}: echo op off the float64 result by {errors[0]:.2e} (torch {errors[1]:.2e})")
        return None
    echo_s, torch_s = (median_seconds(fn, repeats, torch.device("cpu")) for fn in (echo_fn, torch_fn))
    print(f"| {label} | {1e3 * echo_s:.2f} | {1e3 * torch_s:.2f} | {torch_s / echo_s:.2f} | {errors[0]:.1e} | "
          f"{errors[1]:.1e} |")
    return echo_s


def attention_kernel(length: int, dtype: torch.dtype) -> str | None:
    """The compiled kernel echo's CPU attention runs on sequences of this length, None for SDPA."""
    if dtype == torch.bfloat16 and attention_ops.tiles_usable() and length >= attention_ops.TILE_FROM:
        return "tile"
    return "FMA" if length <= attention_ops.SHORT_TOKENS else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.repeats < 1:  # else a median of no times, after the peak measurement
        parser.error("--repeats must be at least 1")
    missing = [f"{op}: {why}" for op in ("residual_layer_norm", "short_attention")
               if (why := extension.why_unavailable(op, "cpu"))]
    if missing or not linear_ops.available():
        print("skipped: " + "; ".join(missing + ([] if linear_ops.available() else ["no oneDNN bf16 linear ops"])))
        return 0
    torch.manual_seed(0)
    # warm (AMX speeds up ~2x over its first second): the same peak as bench/encode_throughput.py
    peaks = {dtype: machine_peak(dtype, "cpu") for dtype in (torch.bfloat16, torch.float32)}
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| op | echo ms | torch ms | torch / echo | echo error | torch error |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    ok, layer_products = True, {}
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float32, 1e-6)):
        for inputs, outputs, gelu in LAYER_PRODUCTS:
            x = torch.randn(TOKENS, inputs).to(dtype)
            weight, bias = torch.randn(outputs, inputs) * inputs**-0.5, torch.randn(outputs) * 0.1
            packed = linear_ops.PackedLinear(weight, bias, dtype)
            w, b = weight.to(dtype), bias.to(dtype)
            activation = F.gelu if gelu else (lambda y: y)
            truth = activation(F.linear(x.double(), w.double(), b.double()))
            seconds = compare(f"product {inputs}->{outputs}{' + GELU' if gelu else ''} ({str(dtype)[6:]})",
                              lambda: packed(x, gelu=gelu), lambda: activation(F.linear(x, w, b)), truth, tolerance,
                              args.repeats)
            ok &= seconds is not None
            layer_products[dtype] = layer_products.get(dtype, 0.0) + (seconds or float("nan"))
    residual, stream = torch.randn(TOKENS, DIM).bfloat16(), torch.randn(TOKENS, DIM) * 3
    weight, bias = torch.randn(DIM), torch.randn(DIM)
    truth = F.layer_norm(stream.double() + residual.double(), (DIM,), weight.double(), bias.double(), 1e-5)

    def torch_norm():
        out = F.layer_norm(stream + residual, (DIM,), weight, bias, 1e-5)
        return out, out.to(torch.bfloat16)

    ok &= None is not compare("residual + LayerNorm + bf16 copy", lambda: torch.ops.echo.residual_layer_norm(
        stream, residual, weight, bias, 1e-5, True)[0], lambda: torch_norm()[0], truth, 1e-6, args.repeats)
    residual = residual.float()  # the float32 path: its products hand over float32, no bf16 copy
    ok &= None is not compare("residual + LayerNorm (float32)", lambda: torch.ops.echo.residual_layer_norm(
        stream, residual, weight, bias, 1e-5, False)[0], lambda: F.layer_norm(stream + residual, (DIM,), weight, bias,
        1e-5), truth, 1e-6, args.repeats)
    for dtype in (torch.bfloat16, torch.float32):
        for length in (5, 12, 17, 24, 32, 48, 64, 96, 126):
            kernel = attention_kernel(length, dtype)
            if kernel is None:
                continue
            packing = Packing.from_lengths(torch.full((TOKENS // length,), length))
            qkv = torch.randn(packing.total_tokens, 3 * DIM).to(dtype)
            truth = attention_ops.varlen_attention(qkv.double(), packing.cu_seqlens, HEADS)
            ok &= None is not compare(f"attention, {length}-token sequences ({str(dtype)[6:]}, {kernel} kernel)",
                          lambda: attention_ops.compiled_then_grouped_attention(qkv, packing, HEADS),
                          lambda: attention_ops.grouped_attention(qkv, packing.groups, HEADS), truth,
                          1e-2 if dtype == torch.bfloat16 else 1e-6, args.repeats)
    if attention_ops.tiles_usable():  # the A/B behind TILE_FROM
        print("\n| bf16 attention, sequences of | tile kernel ms | FMA kernel ms | FMA / tile |\n| ---: | ---: | ---: | ---: |")
        for length in (3, 4, 5, 6, 8, 12, 17, 24, 32, 48, 64, 96, 126):
            packing = Packing.from_lengths(torch.full((TOKENS // length,), length))
            qkv = torch.randn(packing.total_tokens, 3 * DIM).to(torch.bfloat16)
            tile_s, fma_s = (median_seconds(lambda: op(qkv, packing.cu_seqlens, HEADS), args.repeats, torch.device("cpu"))
                             for op in (torch.ops.echo.tile_attention, torch.ops.echo.short_attention))
            print(f"| {length} | {1e3 * tile_s:.2f} | {1e3 * fma_s:.2f} | {fma_s / tile_s:.2f} |")
    flops = sum(2 * TOKENS * inputs * outputs for inputs, outputs, _ in LAYER_PRODUCTS)
    for dtype, seconds in layer_products.items():
        print(f"a layer's {len(LAYER_PRODUCTS)} products ({str(dtype)[6:]}, GELU included): {1e3 * seconds:.1f} ms, "
              f"{flops / seconds / 1e9:.0f} GFLOP/s = {100 * flops / seconds / peaks[dtype]:.0f}% of this run's "
              f"measured peak ({peaks[dtype] / 1e9:.0f} GFLOP/s): the most an encode's products can reach here")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
