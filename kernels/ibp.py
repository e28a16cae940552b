"""Triton kernels of interval bound propagation (robust_fast.kernels.ibp), with the semantics of
robust_fast/reference/ibp.py and the element math of csrc/include/robust_fast/ibp_math.h.

_ibp_linear_kernel: one program per (BLOCK_M x BLOCK_N) tile of the output; it walks the
reduction dimension once, loading each tile of the center, the radius and W once, |W| taken on
load, and accumulates both products (center @ W.T and radius @ |W|.T) in float32 (float64 for
float64 inputs; tl.dot in IEEE precision, no TF32). The epilogue adds the bias and, with RELU,
maps the interval through ReLU before the only store. The same kernel with W.T in place of W
gives the input gradients (grad_center @ W, grad_radius @ |W|).

Convolution takes the simpler route: F.unfold (im2col) of the center and the radius, then the
linear kernel per group, the result folded back to (N, C_out, H_out, W_out); its backward is the
linear kernel's on the columns, folded back by F.fold (unfold's adjoint).

_ibp_relu_kernel / _ibp_relu_backward_kernel: elementwise over one flat dense layout.

Each launcher returns what the C++ op of the same name returns (ibp_linear_triton as
torch.ops.robust_fast.ibp_linear, _ibp_linear_backward_triton as _ibp_linear_backward, ...; |W|
is taken on load, so no abs_weight). robust_fast/ops/ibp.py validates the arguments, lays the
elementwise operands out (one shared dense layout) and owns the autograd.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import on_device_of, tl_accumulation_dtype

BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 32
BLOCK_ELEMENTS = 1024


@triton.jit
def _relu(v):
    """max(v, 0) with NaN kept NaN, as torch.relu and ibp_math.h (tl.maximum may drop a NaN)."""
    return tl.where(v > 0.0, v, tl.where(v != v, v, 0.0))


@triton.jit
def _interval_relu(c, r):
    """[c - r, c + r] through ReLU, back in center/radius form."""
    lo = _relu(c - r)
    hi = _relu(c + r)
    return (hi + lo) * 0.5, (hi - lo) * 0.5


@triton.jit
def _ibp_linear_kernel(c_ptr, r_ptr, w_ptr, b_ptr, co_ptr, ro_ptr, M, N, K,
                       stride_cm, stride_ck, stride_rm, stride_rk, stride_wn, stride_wk, stride_b,
                       HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc_c = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x_mask = (rm[:, None] < M) & (kk[None, :] < K)
        c = tl.load(c_ptr + rm[:, None] * stride_cm + kk[None, :] * stride_ck, mask=x_mask, other=0.0).to(ACC)
        r = tl.load(r_ptr + rm[:, None] * stride_rm + kk[None, :] * stride_rk, mask=x_mask, other=0.0).to(ACC)
        # A (BLOCK_K, BLOCK_N) tile of W.T, read once for both products.
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0).to(ACC)
        acc_c += tl.dot(c, w, input_precision="ieee", out_dtype=ACC)
        acc_r += tl.dot(r, tl.abs(w), input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        acc_c += tl.load(b_ptr + rn * stride_b, mask=rn < N, other=0.0).to(ACC)[None, :]
    if RELU:
        acc_c, acc_r = _interval_relu(acc_c, acc_r)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    offsets = rm[:, None] * N + rn[None, :]
    tl.store(co_ptr + offsets, acc_c.to(co_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ro_ptr + offsets, acc_r.to(ro_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _ibp_relu_kernel(c_ptr, r_ptr, co_ptr, ro_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    c = tl.load(c_ptr + offsets, mask=mask, other=0.0).to(ACC)
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(ACC)
    c_out, r_out = _interval_relu(c, r)
    tl.store(co_ptr + offsets, c_out.to(co_ptr.dtype.element_ty), mask=mask)
    tl.store(ro_ptr + offsets, r_out.to(ro_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ibp_relu_backward_kernel(gco_ptr, gro_ptr, c_ptr, r_ptr, gc_ptr, gr_ptr, n,
                              ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gco = tl.load(gco_ptr + offsets, mask=mask, other=0.0).to(ACC)
    gro = tl.load(gro_ptr + offsets, mask=mask, other=0.0).to(ACC)
    c = tl.load(c_ptr + offsets, mask=mask, other=0.0).to(ACC)
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(ACC)
    grad_hi = gco * 0.5 + gro * 0.5
    grad_lo = gco * 0.5 - gro * 0.5
    through_hi = tl.where(c + r > 0.0, grad_hi, 0.0)
    through_lo = tl.where(c - r > 0.0, grad_lo, 0.0)
    tl.store(gc_ptr + offsets, (through_hi + through_lo).to(gc_ptr.dtype.element_ty), mask=mask)
    tl.store(gr_ptr + offsets, (through_hi - through_lo).to(gr_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers

def _dual_products(x_c: torch.Tensor, x_r: torch.Tensor, w: torch.Tensor, w_stride_n: int,
                   w_stride_k: int, n: int, bias: Optional[torch.Tensor], relu: bool):
    """(x_c @ w.T + bias, x_r @ |w|.T) for 2-D x_c, x_r (M, K); w addressed as w[n, k] =
    w_ptr + n * w_stride_n + k * w_stride_k."""
    m, k = x_c.shape
    c_out = torch.empty((m, n), dtype=x_c.dtype, device=x_c.device)
    r_out = torch.empty((m, n), dtype=x_c.dtype, device=x_c.device)
    if m == 0 or n == 0:
        return c_out, r_out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    with on_device_of(x_c):
        _ibp_linear_kernel[grid](
            x_c, x_r, w, bias if bias is not None else x_c, c_out, r_out, m, n, k,
            x_c.stride(0), x_c.stride(1), x_r.stride(0), x_r.stride(1), w_stride_n, w_stride_k,
            bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None, RELU=relu, ACC=tl_accumulation_dtype(x_c.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return c_out, r_out


def _input_grads(grad_c: torch.Tensor, grad_r: torch.Tensor, w: torch.Tensor):
    """(grad_c @ w, grad_r @ |w|) for 2-D w (N, K): the dual products with w.T."""
    return _dual_products(grad_c, grad_r, w, w.stride(1), w.stride(0), w.shape[1], None, False)


def _weight_grad(grad_c: torch.Tensor, grad_r: torch.Tensor, x_c: torch.Tensor, x_r: torch.Tensor,
                 w: torch.Tensor) -> torch.Tensor:
    # d|W|/dW = sign(W) (0 at 0, as torch.abs's gradient).
    return grad_c.t().mm(x_c).addcmul_(torch.sign(w), grad_r.t().mm(x_r))


def _nothing(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def ibp_relu_triton(center: torch.Tensor, radius: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """center and radius in one shared dense layout; the outputs in it too."""
    c_out, r_out = torch.empty_like(center), torch.empty_like(center)
    n = center.numel()
    if n:
        with on_device_of(center):
            _ibp_relu_kernel[(triton.cdiv(n, BLOCK_ELEMENTS),)](
                center, radius, c_out, r_out, n, ACC=tl_accumulation_dtype(center.dtype),
                BLOCK=BLOCK_ELEMENTS)
    return c_out, r_out


def _ibp_relu_backward_triton(grad_center: torch.Tensor, grad_radius: torch.Tensor, center: torch.Tensor,
                              radius: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All four in one shared dense layout; the gradients in it too."""
    gc, gr = torch.empty_like(center), torch.empty_like(center)
    n = center.numel()
    if n:
        with on_device_of(center):
            _ibp_relu_backward_kernel[(triton.cdiv(n, BLOCK_ELEMENTS),)](
                grad_center, grad_radius, center, radius, gc, gr, n,
                ACC=tl_accumulation_dtype(center.dtype), BLOCK=BLOCK_ELEMENTS)
    return gc, gr


def ibp_linear_triton(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(center @ W.T + b, radius @ |W|.T) for center, radius (..., in), then ReLU if relu."""
    leading = tuple(center.shape[:-1])
    c2 = center.reshape(-1, center.shape[-1])
    r2 = radius.reshape(-1, radius.shape[-1])
    c_out, r_out = _dual_products(c2, r2, weight, weight.stride(0), weight.stride(1), weight.shape[0],
                                  bias, relu)
    return c_out.view(leading + (weight.shape[0],)), r_out.view(leading + (weight.shape[0],))


def _ibp_linear_backward_triton(grad_center: torch.Tensor, grad_radius: torch.Tensor, center: torch.Tensor,
                                radius: torch.Tensor, weight: torch.Tensor, output_mask: Sequence[bool]
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (center, radius), weight and bias; output_mask = (center and radius, weight,
    bias), an empty tensor where not asked for."""
    out_features, in_features = weight.shape
    gc = grad_center.reshape(-1, out_features)
    gr = grad_radius.reshape(-1, out_features)
    grad_c, grad_r, grad_w, grad_b = _nothing(center), _nothing(center), _nothing(weight), _nothing(weight)
    if output_mask[0]:
        grad_c, grad_r = _input_grads(gc, gr, weight)
        grad_c, grad_r = grad_c.view(center.shape), grad_r.view(center.shape)
    if output_mask[1]:
        grad_w = _weight_grad(gc, gr, center.reshape(-1, in_features), radius.reshape(-1, in_features), weight)
    if output_mask[2]:
        grad_b = gc.sum(0)
    return grad_c, grad_r, grad_w, grad_b


def _conv_geometry(center: torch.Tensor, weight: torch.Tensor, stride, padding, dilation):
    """(center as (N, C, H, W), (H_out, W_out), F.unfold's arguments)."""
    images = center.reshape((-1,) + tuple(center.shape[-3:]))
    height, width = images.shape[-2:]
    kh, kw = weight.shape[-2:]
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    unfold = dict(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    return images, (out_h, out_w), unfold


def _columns(images: torch.Tensor, unfold: dict, positions: int) -> torch.Tensor:
    # (N, C*kh*kw, L) -> (N*L, C*kh*kw): one row per output position.
    cols = F.unfold(images, **unfold)
    return cols.transpose(1, 2).reshape(positions, cols.shape[1])


def _fold_columns(cols: torch.Tensor, images: torch.Tensor, length: int, unfold: dict) -> torch.Tensor:
    """_columns' adjoint: rows (N*L, C*kh*kw) summed back onto images shaped as `images`."""
    cols = cols.reshape(images.shape[0], length, cols.shape[1]).transpose(1, 2)
    return F.fold(cols, output_size=tuple(images.shape[-2:]), **unfold)


def _group_weights(weight: torch.Tensor, groups: int) -> List[torch.Tensor]:
    """Group g's weight as the (out_channels / groups, in_channels / groups * kh * kw) matrix."""
    per_group = weight.shape[0] // groups
    return [weight[g * per_group:(g + 1) * per_group].reshape(per_group, -1) for g in range(groups)]


def ibp_conv2d_triton(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """F.conv2d of center (..., C, H, W) with W and b, of radius with |W|: im2col, then the linear
    kernel per group; ReLU in its epilogue if relu. The outputs are channels-last views."""
    c, (out_h, out_w), unfold = _conv_geometry(center, weight, stride, padding, dilation)
    r = radius.reshape(c.shape)
    positions = c.shape[0] * out_h * out_w
    cols_c, cols_r = _columns(c, unfold, positions), _columns(r, unfold, positions)
    out_channels = weight.shape[0]
    rows = cols_c.shape[1] // groups
    out_per_group = out_channels // groups
    pieces_c, pieces_r = [], []
    for g, w_g in enumerate(_group_weights(weight, groups)):
        b_g = None if bias is None else bias[g * out_per_group:(g + 1) * out_per_group]
        pc, pr = _dual_products(cols_c[:, g * rows:(g + 1) * rows], cols_r[:, g * rows:(g + 1) * rows],
                                w_g, w_g.stride(0), w_g.stride(1), out_per_group, b_g, relu)
        pieces_c.append(pc)
        pieces_r.append(pr)
    out_c = pieces_c[0] if groups == 1 else torch.cat(pieces_c, dim=1)
    out_r = pieces_r[0] if groups == 1 else torch.cat(pieces_r, dim=1)
    shape = tuple(center.shape[:-3]) + (out_h, out_w, out_channels)
    # (N*L, C_out) -> (..., C_out, H_out, W_out), a channels-last view.
    return out_c.reshape(shape).movedim(-1, -3), out_r.reshape(shape).movedim(-1, -3)


def _ibp_conv2d_backward_triton(grad_center: torch.Tensor, grad_radius: torch.Tensor, center: torch.Tensor,
                                radius: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                                padding: Sequence[int], dilation: Sequence[int], groups: int,
                                output_mask: Sequence[bool]
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (center, radius), weight and bias, as _ibp_linear_backward_triton's on the
    columns of im2col: the columns' gradients folded back (F.fold), the weight's from the
    columns (recomputed, not kept from the forward pass)."""
    c, (out_h, out_w), unfold = _conv_geometry(center, weight, stride, padding, dilation)
    out_channels = weight.shape[0]
    positions = c.shape[0] * out_h * out_w
    # (..., C_out, H_out, W_out) -> (N*L, C_out), the rows of the forward pass.
    gc = grad_center.reshape((-1,) + tuple(grad_center.shape[-3:])).movedim(1, -1).reshape(positions, out_channels)
    gr = grad_radius.reshape((-1,) + tuple(grad_radius.shape[-3:])).movedim(1, -1).reshape(positions, out_channels)
    grad_c, grad_r, grad_w, grad_b = _nothing(center), _nothing(center), _nothing(weight), _nothing(weight)
    out_per_group = out_channels // groups
    weights = _group_weights(weight, groups)
    if output_mask[0]:
        pieces_c, pieces_r = [], []
        for g, w_g in enumerate(weights):
            pc, pr = _input_grads(gc[:, g * out_per_group:(g + 1) * out_per_group],
                                  gr[:, g * out_per_group:(g + 1) * out_per_group], w_g)
            pieces_c.append(pc)
            pieces_r.append(pr)
        cols_c = pieces_c[0] if groups == 1 else torch.cat(pieces_c, dim=1)
        cols_r = pieces_r[0] if groups == 1 else torch.cat(pieces_r, dim=1)
        grad_c = _fold_columns(cols_c, c, out_h * out_w, unfold).reshape(center.shape)
        grad_r = _fold_columns(cols_r, c, out_h * out_w, unfold).reshape(center.shape)
    if output_mask[1]:
        cols_c = _columns(c, unfold, positions)
        cols_r = _columns(radius.reshape(c.shape), unfold, positions)
        rows = cols_c.shape[1] // groups
        grad_w = torch.cat([
            _weight_grad(gc[:, g * out_per_group:(g + 1) * out_per_group],
                         gr[:, g * out_per_group:(g + 1) * out_per_group],
                         cols_c[:, g * rows:(g + 1) * rows], cols_r[:, g * rows:(g + 1) * rows], w_g)
            for g, w_g in enumerate(weights)]).view(weight.shape)
    if output_mask[2]:
        grad_b = gc.sum(0)
    return grad_c, grad_r, grad_w, grad_b
