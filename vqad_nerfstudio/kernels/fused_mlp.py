"""Small decoder MLPs, forward and backward, in one GPU pass each (Triton).

vqad's decoders are nerfstudio ``MLP`` s of two and three ``nn.Linear`` layers, 64 wide, with ReLU between layers.
In PyTorch every layer is a matrix product with its bias and an activation forward, and two products, a bias sum
and an activation gradient backward; with the concatenation of the colour MLP's input and the slicing of the
density MLP's output, a training step launches about 45 operations for its decoders, where the step is bound by
launching work (docs/benchmarks.md, "GPU fast path"). Here one kernel runs an MLP's forward pass for a block of
rows with every activation in registers; its input may be two tensors side by side and its output may be split in
two, so that neither the concatenation nor the slicing launches work. One kernel runs the backward pass: it
recomputes the forward pass in registers, propagates the gradient back through the layers, writes the input's
gradient, and accumulates the weight and bias gradients of a run of row blocks before adding them atomically to
one buffer (tiny-cuda-nn's fully fused MLPs do the same, but have no biases; these keep ``nn.Linear``'s
parameters, their state-dict keys and the file layout). The PyTorch MLP is the reference and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float
from nerfstudio.field_components.mlp import MLP
from torch import Tensor, nn

from vqad_nerfstudio.kernels import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

MAX_WIDTH = 128
"""The widest layer (input, hidden or output) the kernels hold in registers."""

_FORWARD_BLOCK = 64
"""Rows per forward program."""
_BACKWARD_BLOCK = 64
"""Rows per block of a backward program (each program runs several blocks before adding its gradients)."""
_BACKWARD_PROGRAMS_PER_SM = 4
"""Backward programs per streaming multiprocessor: fewer programs, fewer atomic additions of the weight gradients."""


def _padded(width: int) -> int:
    """The register width of a layer of ``width`` features: a power of two, at least 16 (the matrix units' minimum)."""
    return max(16, triton.next_power_of_2(width))


@dataclass(frozen=True)
class _Shape:
    """What the kernels are specialised on: the widths of the two inputs, of each layer's output (the last one's
    split in two), and the output activation."""

    inputs: Tuple[int, int]
    widths: Tuple[int, ...]
    split: int
    sigmoid: bool

    @property
    def layers(self) -> int:
        return len(self.widths)


def available(mlp: nn.Module, *inputs: Tensor) -> bool:
    """Whether the kernels can run ``mlp`` (a nerfstudio torch ``MLP`` of 1..3 linear layers with biases, ReLU
    between them, no skip connections, no output activation or a sigmoid, at most :data:`MAX_WIDTH` wide) on
    ``inputs`` (one or two float32 ``[n, c]`` tensors on a device the kernels run on, side by side its input)."""
    if not isinstance(mlp, MLP) or mlp.tcnn_encoding is not None or not 1 <= len(inputs) <= 2:
        return False
    layers = list(mlp.layers)
    widths = [sum(x.shape[-1] for x in inputs if x.dim() == 2)] + [layer.out_features for layer in layers]
    return (
        all(runs_on(x) and x.dtype == torch.float32 and x.dim() == 2 for x in inputs)
        and len({x.shape[0] for x in inputs}) == 1
        and inputs[0].shape[0] * max(widths) < 2**31  # 32-bit row offsets in the widest tensor read or written
        and 1 <= len(layers) <= 3
        and all(isinstance(layer, nn.Linear) and layer.bias is not None for layer in layers)
        and all(layer.weight.dtype == torch.float32 for layer in layers)
        and widths[0] == layers[0].in_features
        and max(widths) <= MAX_WIDTH
        and not mlp._skip_connections
        and (len(layers) == 1 or isinstance(mlp.activation, nn.ReLU))
        and (mlp.out_activation is None or isinstance(mlp.out_activation, nn.Sigmoid))
    )


def mlp_forward(
    mlp: MLP, first: Float[Tensor, "n a"], second: Optional[Float[Tensor, "n b"]] = None, split: Optional[int] = None
) -> Tuple[Tensor, ...]:
    """``mlp(torch.cat([first, second], -1))`` (``second`` optional), with the gradients of the inputs and of every
    layer's weight and bias; with ``split``, the output's first ``split`` columns and the rest as two tensors,
    otherwise a tuple of the output alone. The weights are each layer's ``rounded_weight()`` where it has one (the
    decoders' quantised training), else its weight. Requires :func:`available`."""
    inputs = (first,) if second is None else (first, second)
    if not available(mlp, *inputs):
        raise ValueError(f"the fused MLP kernels cannot run this MLP on inputs {[tuple(x.shape) for x in inputs]}")
    layers = list(mlp.layers)
    out = layers[-1].out_features
    if split is not None and not 0 < split < out:
        raise ValueError(f"split must be in 1..{out - 1}, got {split}")
    shape = _Shape(
        inputs=(first.shape[1], 0 if second is None else second.shape[1]),
        widths=tuple(layer.out_features for layer in layers),
        split=out if split is None else split,
        sigmoid=mlp.out_activation is not None,
    )
    parameters: List[Tensor] = []
    for layer in layers:
        parameters += [layer.rounded_weight() if hasattr(layer, "rounded_weight") else layer.weight, layer.bias]
    empty = first.new_empty(first.shape[0], 0)
    outputs = _FusedMLP.apply(shape, first, empty if second is None else second, *parameters)
    return outputs if split is not None else outputs[:1]


def _tf32() -> bool:
    """Whether float32 matrix products may use TF32 (torch's float32 matmul precision, as ``nn.Linear`` obeys)."""
    return torch.get_float32_matmul_precision() != "highest"


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shape: _Shape, first: Tensor, second: Tensor, *parameters: Tensor) -> Tuple[Tensor, Tensor]:
        first, second = first.contiguous(), second.contiguous()
        parameters = tuple(p.contiguous() for p in parameters)
        n = first.shape[0]
        out_a = first.new_empty(n, shape.split)
        out_b = first.new_empty(n, shape.widths[-1] - shape.split)
        if n:
            _forward[(triton.cdiv(n, _FORWARD_BLOCK),)](
                first, second, *_layer_pointers(parameters), out_a, out_b, n,
                **_specialisation(shape), BLOCK=_FORWARD_BLOCK, num_warps=4,
            )  # fmt: skip
        ctx.shape = shape
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(first, second, *parameters)
        return out_a, out_b

    @staticmethod
    def backward(ctx, grad_a: Optional[Tensor], grad_b: Optional[Tensor]):
        shape: _Shape = ctx.shape
        first, second, *parameters = ctx.saved_tensors
        n = first.shape[0]
        sizes = [p.numel() for p in parameters]
        buffer = torch.zeros(sum(sizes), device=first.device, dtype=torch.float32)
        grad_first = torch.empty_like(first) if ctx.needs_input_grad[1] else None
        grad_second = torch.empty_like(second) if ctx.needs_input_grad[2] else None
        if n and (grad_a is not None or grad_b is not None):
            blocks = triton.cdiv(n, _BACKWARD_BLOCK)
            programs = min(blocks, _backward_programs(first.device))
            grad_pointers = [buffer[o:] for o in _offsets(sizes)] + [buffer] * (6 - len(sizes))
            _backward[(programs,)](
                first, second, *_layer_pointers(parameters),
                _or_empty(grad_a, first), _or_empty(grad_b, first),
                _or_empty(grad_first, first), _or_empty(grad_second, first), *grad_pointers, n, blocks,
                **_specialisation(shape), HAS_GRAD_A=grad_a is not None, HAS_GRAD_B=grad_b is not None,
                GRAD_FIRST=grad_first is not None, GRAD_SECOND=grad_second is not None and shape.inputs[1] > 0,
                BLOCK=_BACKWARD_BLOCK, num_warps=8,
            )  # fmt: skip
        elif n:
            for grad in (grad_first, grad_second):
                if grad is not None:
                    grad.zero_()
        parameter_grads = [buffer[o : o + s].view_as(p) for o, s, p in zip(_offsets(sizes), sizes, parameters)]
        return (None, grad_first, grad_second, *parameter_grads)


def _offsets(sizes: Sequence[int]) -> List[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _or_empty(tensor: Optional[Tensor], like: Tensor) -> Tensor:
    """``tensor``, or an empty tensor standing in for a pointer the kernel will not touch."""
    return tensor.contiguous() if tensor is not None else like.new_empty(0)


def _layer_pointers(parameters: Sequence[Tensor]) -> List[Tensor]:
    """Weights and biases of three layers (unused layers point at the first layer's, and are never read)."""
    return list(parameters) + list(parameters[:2]) * ((6 - len(parameters)) // 2)


def _specialisation(shape: _Shape) -> dict:
    widths = list(shape.widths) + [shape.widths[-1]] * (3 - shape.layers)
    in_width = sum(shape.inputs)
    return dict(
        IN_A=shape.inputs[0], IN_B=shape.inputs[1], P0=_padded(in_width),
        W1=widths[0], W2=widths[1], W3=widths[2],
        P1=_padded(widths[0]), P2=_padded(widths[1]), P3=_padded(widths[2]),
        LAYERS=shape.layers, SPLIT=shape.split, SIGMOID=shape.sigmoid,
        PRECISION="tf32" if _tf32() else "ieee",
    )  # fmt: skip


_SM_COUNT: dict = {}


def _backward_programs(device: torch.device) -> int:
    """How many backward programs share the row blocks on ``device``."""
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so that tests accumulate across blocks and programs
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device] * _BACKWARD_PROGRAMS_PER_SM


if triton is not None:

    @triton.jit
    def _load_input(first, second, rows, mask, IN_A: tl.constexpr, IN_B: tl.constexpr, P0: tl.constexpr):
        """The rows' inputs, ``first`` and ``second`` side by side, zero-padded to ``P0`` columns."""
        columns = tl.arange(0, P0)[None, :]
        x = tl.load(first + rows[:, None] * IN_A + columns, mask=mask[:, None] & (columns < IN_A), other=0.0)
        if IN_B > 0:
            beside = (columns >= IN_A) & (columns < IN_A + IN_B)
            x += tl.load(second + rows[:, None] * IN_B + (columns - IN_A), mask=mask[:, None] & beside, other=0.0)
        return x

    @triton.jit
    def _weight(w, K: tl.constexpr, N: tl.constexpr, PK: tl.constexpr, PN: tl.constexpr):
        """A layer's ``[N, K]`` weight, zero-padded to ``[PN, PK]``."""
        n = tl.arange(0, PN)[:, None]
        k = tl.arange(0, PK)[None, :]
        return tl.load(w + n * K + k, mask=(n < N) & (k < K), other=0.0)

    @triton.jit
    def _linear(x, w, b, K: tl.constexpr, N: tl.constexpr, PK: tl.constexpr, PN: tl.constexpr, PRECISION: tl.constexpr):
        """``x @ w.T + b`` for a block of rows (``[BLOCK, PK]`` to ``[BLOCK, PN]``)."""
        weight = _weight(w, K, N, PK, PN)
        bias = tl.load(b + tl.arange(0, PN), mask=tl.arange(0, PN) < N, other=0.0)
        return tl.dot(x, tl.trans(weight), input_precision=PRECISION) + bias[None, :]

    @triton.jit
    def _forward(
        first, second, w1, b1, w2, b2, w3, b3, out_a, out_b, n,
        IN_A: tl.constexpr, IN_B: tl.constexpr, P0: tl.constexpr,
        W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
        LAYERS: tl.constexpr, SPLIT: tl.constexpr, SIGMOID: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        x = _load_input(first, second, rows, mask, IN_A, IN_B, P0)
        y = _linear(x, w1, b1, IN_A + IN_B, W1, P0, P1, PRECISION)
        if LAYERS > 1:
            y = _linear(tl.maximum(y, 0.0), w2, b2, W1, W2, P1, P2, PRECISION)
        if LAYERS > 2:
            y = _linear(tl.maximum(y, 0.0), w3, b3, W2, W3, P2, P3, PRECISION)
        if SIGMOID:
            y = tl.sigmoid(y)
        if LAYERS == 1:
            _store_output(y, out_a, out_b, rows, mask, W1, SPLIT, P1)
        elif LAYERS == 2:
            _store_output(y, out_a, out_b, rows, mask, W2, SPLIT, P2)
        else:
            _store_output(y, out_a, out_b, rows, mask, W3, SPLIT, P3)

    @triton.jit
    def _store_output(y, out_a, out_b, rows, mask, WIDTH: tl.constexpr, SPLIT: tl.constexpr, P: tl.constexpr):
        """Columns ``< SPLIT`` of ``y`` to ``out_a``, the rest (up to ``WIDTH``) to ``out_b``."""
        columns = tl.arange(0, P)[None, :]
        tl.store(out_a + rows[:, None] * SPLIT + columns, y, mask=mask[:, None] & (columns < SPLIT))
        if WIDTH > SPLIT:
            rest = (columns >= SPLIT) & (columns < WIDTH)
            tl.store(out_b + rows[:, None] * (WIDTH - SPLIT) + (columns - SPLIT), y, mask=mask[:, None] & rest)

    @triton.jit
    def _load_output_grad(grad_a, grad_b, rows, mask, WIDTH: tl.constexpr, SPLIT: tl.constexpr, P: tl.constexpr,
                          HAS_GRAD_A: tl.constexpr, HAS_GRAD_B: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """The gradient of the output, its two parts side by side (a missing part is zero)."""
        columns = tl.arange(0, P)[None, :]
        g = tl.zeros([BLOCK, P], dtype=tl.float32)
        if HAS_GRAD_A:
            g += tl.load(grad_a + rows[:, None] * SPLIT + columns, mask=mask[:, None] & (columns < SPLIT), other=0.0)
        if HAS_GRAD_B and WIDTH > SPLIT:
            rest = (columns >= SPLIT) & (columns < WIDTH)
            g += tl.load(
                grad_b + rows[:, None] * (WIDTH - SPLIT) + (columns - SPLIT), mask=mask[:, None] & rest, other=0.0
            )
        return g

    @triton.jit
    def _add_to(grad, values, K: tl.constexpr, N: tl.constexpr, PK: tl.constexpr, PN: tl.constexpr):
        """Add a ``[PN, PK]`` weight gradient (its ``[N, K]`` part) to ``grad`` atomically."""
        n = tl.arange(0, PN)[:, None]
        k = tl.arange(0, PK)[None, :]
        tl.atomic_add(grad + n * K + k, values, mask=(n < N) & (k < K), sem="relaxed")

    @triton.jit
    def _add_bias(grad, values, N: tl.constexpr, PN: tl.constexpr):
        tl.atomic_add(grad + tl.arange(0, PN), values, mask=tl.arange(0, PN) < N, sem="relaxed")

    @triton.jit
    def _backward(
        first, second, w1, b1, w2, b2, w3, b3, grad_a, grad_b, grad_first, grad_second,
        gw1, gb1, gw2, gb2, gw3, gb3, n, blocks,
        IN_A: tl.constexpr, IN_B: tl.constexpr, P0: tl.constexpr,
        W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
        LAYERS: tl.constexpr, SPLIT: tl.constexpr, SIGMOID: tl.constexpr, PRECISION: tl.constexpr,
        HAS_GRAD_A: tl.constexpr, HAS_GRAD_B: tl.constexpr, GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        K0: tl.constexpr = IN_A + IN_B
        weight1 = _weight(w1, K0, W1, P0, P1)
        if LAYERS > 1:
            weight2 = _weight(w2, W1, W2, P1, P2)
        if LAYERS > 2:
            weight3 = _weight(w3, W2, W3, P2, P3)
        sum_w1 = tl.zeros([P1, P0], dtype=tl.float32)
        sum_b1 = tl.zeros([P1], dtype=tl.float32)
        sum_w2 = tl.zeros([P2, P1], dtype=tl.float32)
        sum_b2 = tl.zeros([P2], dtype=tl.float32)
        sum_w3 = tl.zeros([P3, P2], dtype=tl.float32)
        sum_b3 = tl.zeros([P3], dtype=tl.float32)
        for block in range(tl.program_id(0), blocks, tl.num_programs(0)):
            rows = block * BLOCK + tl.arange(0, BLOCK)
            mask = rows < n
            x = _load_input(first, second, rows, mask, IN_A, IN_B, P0)
            # the forward pass again, keeping each layer's input
            z1 = _linear(x, w1, b1, K0, W1, P0, P1, PRECISION)
            h1 = tl.maximum(z1, 0.0)
            if LAYERS == 1:
                y = z1
            elif LAYERS == 2:
                z2 = _linear(h1, w2, b2, W1, W2, P1, P2, PRECISION)
                h2 = tl.maximum(z2, 0.0)
                y = z2
            else:
                z2 = _linear(h1, w2, b2, W1, W2, P1, P2, PRECISION)
                h2 = tl.maximum(z2, 0.0)
                y = _linear(h2, w3, b3, W2, W3, P2, P3, PRECISION)
            # back through the layers, last first
            if LAYERS == 1:
                g = _load_output_grad(grad_a, grad_b, rows, mask, W1, SPLIT, P1, HAS_GRAD_A, HAS_GRAD_B, BLOCK)
            elif LAYERS == 2:
                g = _load_output_grad(grad_a, grad_b, rows, mask, W2, SPLIT, P2, HAS_GRAD_A, HAS_GRAD_B, BLOCK)
            else:
                g = _load_output_grad(grad_a, grad_b, rows, mask, W3, SPLIT, P3, HAS_GRAD_A, HAS_GRAD_B, BLOCK)
            if SIGMOID:
                s = tl.sigmoid(y)
                g = g * s * (1.0 - s)
            if LAYERS > 2:
                sum_w3 += tl.dot(tl.trans(g), h2, input_precision=PRECISION)
                sum_b3 += tl.sum(g, axis=0)
                g = tl.where(z2 > 0.0, tl.dot(g, weight3, input_precision=PRECISION), 0.0)
            if LAYERS > 1:
                sum_w2 += tl.dot(tl.trans(g), h1, input_precision=PRECISION)
                sum_b2 += tl.sum(g, axis=0)
                g = tl.where(z1 > 0.0, tl.dot(g, weight2, input_precision=PRECISION), 0.0)
            sum_w1 += tl.dot(tl.trans(g), x, input_precision=PRECISION)
            sum_b1 += tl.sum(g, axis=0)
            if GRAD_FIRST or GRAD_SECOND:
                gx = tl.dot(g, weight1, input_precision=PRECISION)
                columns = tl.arange(0, P0)[None, :]
                if GRAD_FIRST:
                    tl.store(grad_first + rows[:, None] * IN_A + columns, gx, mask=mask[:, None] & (columns < IN_A))
                if GRAD_SECOND:
                    beside = (columns >= IN_A) & (columns < K0)
                    tl.store(grad_second + rows[:, None] * IN_B + (columns - IN_A), gx, mask=mask[:, None] & beside)
        _add_to(gw1, sum_w1, K0, W1, P0, P1)
        _add_bias(gb1, sum_b1, W1, P1)
        if LAYERS > 1:
            _add_to(gw2, sum_w2, W1, W2, P1, P2)
            _add_bias(gb2, sum_b2, W2, P2)
        if LAYERS > 2:
            _add_to(gw3, sum_w3, W2, W3, P2, P3)
            _add_bias(gb3, sum_b3, W3, P3)


__all__ = ["MAX_WIDTH", "available", "mlp_forward"]
