"""The encoder on packed sequences: every dense op runs once over all tokens of all sequences, attention
runs per sequence through `cu_seqlens`. Used by echo.fast (inference) and echo.pretrain (training)."""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .model import EchoLayer, SelfAttention
from .ops import attention as attention_ops
from .ops import backend as backends
from .ops import linear as linear_ops
from .ops import norm as norm_ops


@dataclass
class Packing:
    """Sequences laid back to back: sequence s is rows cu_seqlens[s]:cu_seqlens[s+1]."""

    cu_seqlens: torch.Tensor  # (S + 1,) int32
    max_seqlen: int
    groups: dict[int, slice | torch.Tensor]  # sequence length -> packed rows of all sequences of that length
    _leading: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)
    _row_sequences: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, device=None) -> "Packing":
        """Sequences of these lengths back to back. A length whose sequences are consecutive gets a slice (a
        view, no copy) in `groups`; order sequences by length to get only slices. ValueError for lengths that
        are not a 1-D tensor of positive integers (a float was cut, a length under 1 gave sequences of no rows or
        overlapping ones). Computed on the CPU, whatever torch's default device."""
        lengths = torch.as_tensor(lengths, device="cpu")
        if lengths.ndim != 1:
            raise ValueError(f"Packing lengths must be 1-D (one per sequence), got shape {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"Packing lengths must be integers, got {lengths.dtype}")
        lengths = lengths.to(torch.int64)
        if len(lengths) and (shortest := int(lengths.min())) < 1:
            raise ValueError(f"Packing lengths must be >= 1, got {shortest}")
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int64, device="cpu")
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        groups: dict[int, slice | torch.Tensor] = {}
        for length in torch.unique(lengths).tolist():
            members = (lengths == length).nonzero().squeeze(1)
            first = cu_seqlens[members]
            if int(members[-1] - members[0]) + 1 == len(members):
                groups[length] = slice(int(first[0]), int(first[0]) + len(members) * length)
            else:
                groups[length] = (first[:, None] + torch.arange(length, device="cpu")).reshape(-1).to(device)
        return cls(cu_seqlens.to(torch.int32).to(device), int(lengths.max()) if len(lengths) else 0, groups)

    @property
    def total_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def row_sequences(self, rows: int, device: torch.device) -> torch.Tensor:
        """The sequence of each of the `rows` packed rows (all of them), int32 on `device`: what the Triton
        attention reads, computed once per packing rather than in every layer."""
        if device not in self._row_sequences:
            from echo_kernels.attention import row_sequences

            self._row_sequences[device] = row_sequences(self.cu_seqlens.to(device, torch.int32), rows)
        return self._row_sequences[device]

    def leading_up_to(self, tokens: int) -> tuple[int, torch.Tensor]:
        """(rows, cu_seqlens): the sequences at the start that have at most `tokens` tokens each, as their
        packed rows and their offsets (int64, on the CPU). Computed once per packing: every layer asks."""
        if tokens not in self._leading:
            cu_seqlens = self.cu_seqlens.cpu().long()
            too_long = (cu_seqlens.diff() > tokens).nonzero()
            sequences = int(too_long[0]) if len(too_long) else len(cu_seqlens) - 1
            self._leading[tokens] = (int(cu_seqlens[sequences]), cu_seqlens[: sequences + 1])
        return self._leading[tokens]


class _EagerOps:
    """A layer's matrix products straight from its modules, in the dtype of their weights, and its norms."""

    def __init__(self, layer, backend: str | None):
        self.layer, self.backend = layer, backend

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.layer.self_attn
        return F.linear(x.to(attn.in_proj_weight.dtype), attn.in_proj_weight, attn.in_proj_bias)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attn.out_proj(x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        linear1 = self.layer.linear1
        return norm_ops.fused_linear_gelu(x.to(linear1.weight.dtype), linear1.weight, linear1.bias, self.backend)

    def mlp_out(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer.linear2(hidden)

    def norm(self, x: torch.Tensor, residual: torch.Tensor, norm) -> tuple[torch.Tensor, None]:
        return norm_ops.fused_residual_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, self.backend), None


class _CPUInferenceOps:
    """The same for inference on a CPU in float32 or bf16: products with weights packed once for oneDNN and
    GELU fused (echo.ops.linear); each norm runs in one pass and, for bf16, also hands the next product its
    bf16 input (echo.ops.norm)."""

    def __init__(self, layer, dtype: torch.dtype):
        attn = layer.self_attn
        self.qkv = linear_ops.PackedLinear(attn.in_proj_weight, attn.in_proj_bias, dtype)
        self.out = linear_ops.PackedLinear(attn.out_proj.weight, attn.out_proj.bias, dtype)
        self.mlp_out = linear_ops.PackedLinear(layer.linear2.weight, layer.linear2.bias, dtype)
        self._linear1 = linear_ops.PackedLinear(layer.linear1.weight, layer.linear1.bias, dtype)
        self._bf16_copy = dtype == torch.bfloat16

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear1(x, gelu=True)

    def norm(self, x: torch.Tensor, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor | None]:
        return norm_ops.residual_layer_norm_inference(x, residual, norm.weight, norm.bias, norm.eps, self._bf16_copy)


def _layer_ops(layer, backend: str | None):
    """The CPU inference ops where inference_copy prepared them, unless a backend is forced for the layer's
    glue (`backend`, ECHO_BACKEND_NORM or ECHO_BACKEND: torch, triton or reference), which runs the eager ops
    with it."""
    prepared = getattr(layer, "cpu_inference_ops", None)
    if prepared is not None and backends.forced("norm", backend) in (None, "csrc"):
        return prepared
    return _EagerOps(layer, backend)


# Modules of an encoder layer that EchoModel.encode runs (calls) but the packed path only reads tensors from.
READ_NOT_RUN = {(): EchoLayer, ("self_attn",): SelfAttention, ("self_attn", "out_proj"): nn.Linear,
                ("linear2",): nn.Linear}


def check_layers_run_as_built(model) -> None:
    """ValueError naming a layer's module whose forward is not its class's own (an adapter such as LoRA in place
    of out_proj or linear2, or a forward set on the module itself): the packed path reads such modules' weights
    and runs its own ops, so it left out what that forward adds, silently (LoRA on out_proj and linear2: 0.36
    off model.encode). Once a call: the attributes are walked, not looked up by dotted name (get_submodule:
    0.23 ms a call for ECHO-small)."""
    for index, layer in enumerate(model.encoder.layers):
        for path, built in READ_NOT_RUN.items():
            module = layer
            for part in path:
                module = getattr(module, part, None)
            patched = module is not None and "forward" in vars(module)
            if patched or getattr(type(module), "forward", None) is not built.forward:
                name = ".".join(("encoder.layers", str(index), *path))
                what = "has a forward set on the module itself" if patched else \
                    f"is a {type(module).__name__}, whose forward is not {built.__name__}'s"
                raise ValueError(
                    f"model.{name} {what}: echo.fast reads its weights and does not run its forward, so it would "
                    f"leave out what that forward changes; merge the change into the weights first (peft: "
                    f"merge_and_unload()) or use model.encode")


def layer_forward(
    layer, x: torch.Tensor, packing: Packing, backend: str | None = None, x_low: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One post-norm ECHO layer on a packed (total, D) buffer. The matrix products run in the dtype of the
    layer's linear weights (see inference_copy); the residual stream and the norms stay in x's dtype.
    `x_low` is x already cast for the first product, when the previous layer made it; returns the layer's
    output and, on the CPU bf16 inference path, its bf16 copy (else None)."""
    ops = _layer_ops(layer, backend)
    qkv = ops.qkv(x if x_low is None else x_low)
    return _after_attention(ops, layer, x, attention_ops.packed_attention(qkv, packing, layer.self_attn.heads, backend))


def cls_layer_forward(
    layer, x: torch.Tensor, packing: Packing, backend: str | None = None, x_low: torch.Tensor | None = None,
    row_step: int = 1,
) -> torch.Tensor:
    """layer_forward's output at each sequence's CLS row alone, (S, D) in sequence order: keys and values
    come from every token, the rest of the layer (three quarters of its products) runs on the CLS rows, padded
    with zero rows to a multiple of `row_step` for the products (a CPU builds one per row count)."""
    ops = _layer_ops(layer, backend)
    qkv = ops.qkv(x if x_low is None else x_low)
    cls_rows = packing.cu_seqlens[:-1].long()
    if backends.forced("attention", backend):  # the forced backend runs, on every query, as in the other layers
        attended = attention_ops.packed_attention(qkv, packing, layer.self_attn.heads, backend)[cls_rows]
    else:
        attended = attention_ops.first_token_attention(qkv, packing, layer.self_attn.heads)
    residual = x[cls_rows]
    padding = -residual.shape[0] % row_step
    if padding:
        attended, residual = (F.pad(t, (0, 0, 0, padding)) for t in (attended, residual))
    return _after_attention(ops, layer, residual, attended)[0][: attended.shape[0] - padding]


def _after_attention(ops, layer, x: torch.Tensor, attended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer from its attention output on: out-projection, residual + norm, MLP, residual + norm."""
    x, x_low = ops.norm(x, ops.out(attended), layer.norm1)
    hidden = ops.hidden(x if x_low is None else x_low)
    return ops.norm(x, ops.mlp_out(hidden), layer.norm2)


def inference_copy(model, dtype: torch.dtype, weights: list[torch.Tensor] | None = None):
    """A float32 copy of the model for inference with matrix products in `dtype`, whatever the model's own
    dtype (a .double() or .half() model too: the residual stream is float32). Its attention and MLP matrices
    are in `dtype` (bf16: 2-10x faster products on AVX-512-BF16 or AMX CPUs, and tensor cores); patch
    projection, embeddings and norms stay float32, so does the residual stream (measured faster than autocast
    on CPU, which re-casts activations at every product). On a CPU whose torch has oneDNN's packed ops for
    `dtype` (float32 or bf16), each layer also gets _CPUInferenceOps: no autograd through those.
    `weights`: the model's tensors as _source_weights gives them, to build it from (by default taken here); the
    copy shares no tensor with the model, so a later write to the model cannot half-reach it."""
    named = _named_tensors(model)
    tensors = [tensor for _, tensor in named]
    weights = _source_weights(named) if weights is None else weights
    owned = {id(tensor): nn.Parameter(weight, requires_grad=False) if isinstance(tensor, nn.Parameter) else weight
             for tensor, weight in zip(tensors, weights)}
    copy = deepcopy(model, {**owned, **_attributes_shared(model), **_hooks_left_behind(model)}).float()
    for layer in copy.encoder.layers:
        for module in (layer.self_attn, layer.linear1, layer.linear2):
            module.to(dtype)
    if copy.device.type == "cpu" and linear_ops.available(dtype):
        for layer in copy.encoder.layers:
            layer.cpu_inference_ops = _CPUInferenceOps(layer, dtype)
    return copy


_MODULE_STATE = frozenset(vars(nn.Module()))  # what every module keeps: its tensors, submodules, hooks, mode


def _attributes_shared(model) -> dict[int, object]:
    """deepcopy memo entries that share every other attribute of the model's modules with the copy (the config,
    the sizes, anything a user hung on them) instead of copying it: the encoder reads none of them but what
    the copy's signature compares, and a lock or an open file among them made fast.encode fail."""
    return {id(value): value for module in model.modules() for name, value in vars(module).items()
            if name not in _MODULE_STATE and not isinstance(value, (nn.Module, torch.Tensor, _InferenceCopies))}


def _hooks_left_behind(model) -> dict[int, dict]:
    """deepcopy memo entries that give the copy empty hook dicts: hooks never run on packed tokens, and deepcopy
    copied each bound-method hook's owner (a feature-capture object holding a lock made fast.encode fail)."""
    return {id(hooks): type(hooks)() for module in model.modules() for name, hooks in vars(module).items()
            if name.endswith("_hooks") and isinstance(hooks, dict)}


def _named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _source_weights(named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Detached copies of the model's tensors: what an inference copy is built from and later compared with."""
    return [tensor.detach().clone() for _, tensor in named]


def _unchanged(named: list[tuple[str, torch.Tensor]], weights: list[torch.Tensor], device: torch.device) -> bool:
    """The model's tensors (`named`) equal `weights`, exactly. On a GPU with a few multi-tensor launches per
    dtype and one wait: two launches per tensor (ne, any) were ~300 for ECHO-small, a third of a W1 call's host
    time on an H200 (bench/RESULTS.md). There a floating tensor is unchanged when the L1 norm of its difference
    is 0: a sum of magnitudes cannot round a nonzero difference to 0 (a squared one can) and carries NaN (a
    weight that became NaN, or inf - inf) as a change."""
    pairs = [(tensor.detach(), weight) for (_, tensor), weight in zip(named, weights)]
    if device.type == "cpu":
        return all(torch.equal(tensor, weight) for tensor, weight in pairs)
    by_dtype: dict[torch.dtype | None, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # None: not floating
    for tensor, weight in pairs:
        by_dtype.setdefault(tensor.dtype if tensor.is_floating_point() else None, []).append((tensor, weight))
    changed = [torch.ne(tensor, weight).any() for tensor, weight in by_dtype.pop(None, [])]
    for group in by_dtype.values():
        differences = torch._foreach_sub([tensor for tensor, _ in group], [weight for _, weight in group])
        changed.append(torch.stack(torch._foreach_norm(differences, 1)).ne(0).any())
    return not (changed and torch.stack(changed).any().item())


def _signature(model, dtype: torch.dtype, named: list[tuple[str, torch.Tensor]]) -> tuple:
    """Everything but tensor values that an inference copy is built from: the tensors' names and layouts, and
    what the encoder reads from the modules besides tensors (the config, the norms' eps, the heads)."""
    return (
        dtype,
        model.config,
        tuple(module.eps for module in model.modules() if isinstance(module, nn.LayerNorm)),
        tuple(layer.self_attn.heads for layer in model.encoder.layers),
        tuple((name, tensor.shape, tensor.dtype, tensor.device) for name, tensor in named),
    )


INFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the encoders' products run in


class _InferenceCopies(dict):
    """A model's inference copies, dtype -> (signature, weights, copy), kept on the model itself. A copy shares
    the model's plain attributes, and one may lead back to the model (`model.encode_fn = model.encode`, a patched
    forward): in a global weak-keyed table such a copy kept its model, itself and its weights alive for good, a
    leak per model a service loaded. On the model, the cycle is garbage like any other. A copy or a pickle of the
    model starts with none."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


_COPIES_ATTRIBUTE = "_echo_inference_copies"


def check_dtype(dtype) -> None:
    """One of INFERENCE_DTYPES, the dtypes the encoders' products run in."""
    if dtype not in INFERENCE_DTYPES:
        # a name such as "bfloat16" (the CLI's --dtype) printed as "got bfloat16", as if torch.bfloat16 were refused
        named = isinstance(dtype, str) and getattr(torch, dtype, None) in INFERENCE_DTYPES
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}"
                         + (f": pass torch.{dtype}, not its name" if named else ""))


def inference_model(model, dtype: torch.dtype, snapshot: bool = False):
    """The float32 model itself where no faster inference ops exist (unless `snapshot`: a stream encodes with
    the weights it started with, and the model itself would change under it); otherwise a cached inference copy
    (inference_copy), rebuilt when anything it was built from changed: a tensor's values, however written (an
    optimiser step, a load, `p.data.copy_(...)`, which no version counter sees), its device, a norm's eps.
    Every call compares the model's tensors with the copy's source values in full: ~4 ms for ECHO-tiny and
    ~15 ms for ECHO-small on one core, for an exact answer (a sampled check can miss a write). Those source
    values cost one copy of the weights in memory (for a float32 model, the copy's own float32 tensors)."""
    check_dtype(dtype)
    packs = model.device.type == "cpu" and linear_ops.available(dtype)
    if (not snapshot and dtype == torch.float32 and not packs
            and all(p.dtype == torch.float32 for p in model.parameters())):
        return model
    named = _named_tensors(model)  # once a call: the signature and the comparison both walk them
    signature = _signature(model, dtype, named)
    copies = vars(model).setdefault(_COPIES_ATTRIBUTE, _InferenceCopies())
    cached = copies.get(dtype)
    if cached is not None and cached[0] == signature and _unchanged(named, cached[1], model.device):
        return cached[2]
    copies.pop(dtype, None)  # the stale copy goes before the new one is built: less peak memory
    weights = _source_weights(named)
    cached = (signature, weights, inference_copy(model, dtype, weights))
    copies[dtype] = cached
    return cached[2]


def forward(
    model, x: torch.Tensor, packing: Packing, backend: str | None = None, return_layers: bool = False,
    cls_only: bool = False, row_step: int = 1,
):
    """All layers and the final norm on packed tokens; with return_layers also each layer's output
    (before the final norm), as pretraining targets need. With cls_only, only each sequence's CLS output
    (S, D): what an utterance embedding reads, for 6% fewer FLOPs in ECHO-small (see cls_layer_forward)."""
    if cls_only and return_layers:
        raise ValueError("return_layers needs every token's output; it cannot be combined with cls_only")
    layers, x_low = [], None
    *body, last = model.encoder.layers
    for layer in body if cls_only else model.encoder.layers:
        x, x_low = layer_forward(layer, x, packing, backend, x_low)
        if return_layers:
            layers.append(x)
    if cls_only:
        x = cls_layer_forward(last, x, packing, backend, x_low, row_step)
    out = model.norm(x)
    return (out, layers) if return_layers else out
