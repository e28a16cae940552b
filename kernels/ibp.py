"""Triton kernels of interval bound propagation (robust_fast.kernels.ibp), with the semantics of
robust_fast/reference/ibp.py and the element math of csrc/include/robust_fast/ibp_math.h.

_ibp_linear_kernel: one program per (BLOCK_M x BLOCK_N) tile of the output; it walks the
reduction dimension once, loading each tile of the center, the radius and W once, |W| taken on
load, and accumulates both products (center @ W.T and radius @ |W|.T) in float32 (float64 for
float64 inputs; tl.dot in IEEE precision, no TF32). The epilogue adds the bias and, with RELU,
maps the interval through ReLU before the only store. The same kernel with W.T in place of W
gives the input gradients (grad_center @ W, grad_radius @ |W|).

Convolution takes the simpler route: F.unfold (im2col) of the center and the radius, then the
linear kernel per group, the result folded back to (N, C_out, H_out, W_out); autograd runs
through unfold and the linear Function.

_ibp_relu_kernel / _ibp_relu_backward_kernel: elementwise over one flat dense layout.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from robust_fast._layout import is_non_overlapping_and_dense

BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 32
BLOCK_ELEMENTS = 1024


@triton.jit
def _ibp_linear_kernel(c_ptr, r_ptr, w_ptr, b_ptr, co_ptr, ro_ptr, M, N, K,
                       stride_cm, stride_ck, stride_rm, stride_rk, stride_wn, stride_wk,
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
        acc_c += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    if RELU:
        lo = tl.maximum(acc_c - acc_r, 0.0)
        hi = tl.maximum(acc_c + acc_r, 0.0)
        acc_c = (hi + lo) * 0.5
        acc_r = (hi - lo) * 0.5
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
    lo = tl.maximum(c - r, 0.0)
    hi = tl.maximum(c + r, 0.0)
    tl.store(co_ptr + offsets, ((hi + lo) * 0.5).to(co_ptr.dtype.element_ty), mask=mask)
    tl.store(ro_ptr + offsets, ((hi - lo) * 0.5).to(ro_ptr.dtype.element_ty), mask=mask)


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


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


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
    with _on_device_of(x_c):
        _ibp_linear_kernel[grid](
            x_c, x_r, w, bias if bias is not None else x_c, c_out, r_out, m, n, k,
            x_c.stride(0), x_c.stride(1), x_r.stride(0), x_r.stride(1), w_stride_n, w_stride_k,
            HAS_BIAS=bias is not None, RELU=relu, ACC=_acc(x_c.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return c_out, r_out


def _on_device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, whichever device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _elementwise_inputs(*tensors: torch.Tensor):
    first = tensors[0]
    if is_non_overlapping_and_dense(first) and all(t.stride() == first.stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def _relu_forward(center: torch.Tensor, radius: torch.Tensor):
    center, radius = _elementwise_inputs(center, radius)
    c_out, r_out = torch.empty_like(center), torch.empty_like(center)
    n = center.numel()
    if n:
        with _on_device_of(center):
            _ibp_relu_kernel[(triton.cdiv(n, BLOCK_ELEMENTS),)](
                center, radius, c_out, r_out, n, ACC=_acc(center.dtype), BLOCK=BLOCK_ELEMENTS)
    return c_out, r_out


def _relu_backward(grad_center, grad_radius, center, radius):
    grad_center, grad_radius, center, radius = _elementwise_inputs(grad_center, grad_radius, center, radius)
    gc, gr = torch.empty_like(center), torch.empty_like(center)
    n = center.numel()
    if n:
        with _on_device_of(center):
            _ibp_relu_backward_kernel[(triton.cdiv(n, BLOCK_ELEMENTS),)](
                grad_center, grad_radius, center, radius, gc, gr, n, ACC=_acc(center.dtype),
                BLOCK=BLOCK_ELEMENTS)
    return gc, gr


# --------------------------------------------------------------------------------------------
# autograd

class TritonIBPLinear(torch.autograd.Function):
    """(center, radius) (M, K) through W (N, K) and bias; relu only without autograd."""

    @staticmethod
    def forward(ctx, center, radius, weight, bias, relu):
        ctx.save_for_backward(center, radius, weight)
        ctx.has_bias = bias is not None
        return _dual_products(center, radius, weight, weight.stride(0), weight.stride(1),
                              weight.shape[0], bias, relu)

    @staticmethod
    def backward(ctx, grad_center, grad_radius):
        center, radius, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gc = gr = gw = gb = None
        if need[0] or need[1]:
            # The same kernel with W.T: (grad_center @ W, grad_radius @ |W|).
            gc, gr = _dual_products(grad_center, grad_radius, weight, weight.stride(1), weight.stride(0),
                                    weight.shape[1], None, False)
        if need[2]:
            gw = grad_center.t().mm(center).addcmul_(torch.sign(weight), grad_radius.t().mm(radius))
        if ctx.has_bias and need[3]:
            gb = grad_center.sum(0)
        return gc, gr, gw, gb, None


class TritonIBPRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, center, radius):
        ctx.save_for_backward(center, radius)
        return _relu_forward(center, radius)

    @staticmethod
    def backward(ctx, grad_center, grad_radius):
        center, radius = ctx.saved_tensors
        return _relu_backward(grad_center, grad_radius, center, radius)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ibp_relu_triton(center: torch.Tensor, radius: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return TritonIBPRelu.apply(center, radius)


def ibp_linear_triton(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """robust_fast.ibp_linear on the Triton backend (arguments validated by it)."""
    if relu and _needs_grad(center, radius, weight, bias):
        return ibp_relu_triton(*ibp_linear_triton(center, radius, weight, bias, False))
    leading = tuple(center.shape[:-1])
    c2 = center.reshape(-1, center.shape[-1])
    r2 = radius.reshape(-1, radius.shape[-1])
    c_out, r_out = TritonIBPLinear.apply(c2, r2, weight, bias, relu)
    return c_out.view(leading + (weight.shape[0],)), r_out.view(leading + (weight.shape[0],))


def ibp_conv2d_triton(center: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """robust_fast.ibp_conv2d on the Triton backend: im2col, then the linear kernel per group."""
    if relu and _needs_grad(center, radius, weight, bias):
        return ibp_relu_triton(*ibp_conv2d_triton(center, radius, weight, bias, stride, padding,
                                                  dilation, groups, False))
    leading = tuple(center.shape[:-3])
    c = center.reshape((-1,) + tuple(center.shape[-3:]))
    r = radius.reshape((-1,) + tuple(radius.shape[-3:]))
    batch, channels, height, width = c.shape
    out_channels, per_group, kh, kw = weight.shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    unfold = dict(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    # (N, C*kh*kw, L) -> (N*L, C*kh*kw): one row per output position.
    cols_c = F.unfold(c, **unfold).transpose(1, 2).reshape(batch * out_h * out_w, channels * kh * kw)
    cols_r = F.unfold(r, **unfold).transpose(1, 2).reshape(batch * out_h * out_w, channels * kh * kw)
    rows = per_group * kh * kw
    out_per_group = out_channels // groups
    pieces_c, pieces_r = [], []
    for g in range(groups):
        w_g = weight[g * out_per_group:(g + 1) * out_per_group].reshape(out_per_group, rows)
        b_g = None if bias is None else bias[g * out_per_group:(g + 1) * out_per_group]
        pc, pr = TritonIBPLinear.apply(cols_c[:, g * rows:(g + 1) * rows], cols_r[:, g * rows:(g + 1) * rows],
                                       w_g, b_g, relu)
        pieces_c.append(pc)
        pieces_r.append(pr)
    out_c = pieces_c[0] if groups == 1 else torch.cat(pieces_c, dim=1)
    out_r = pieces_r[0] if groups == 1 else torch.cat(pieces_r, dim=1)
    shape = leading + (out_h, out_w, out_channels)
    # (N*L, C_out) -> (..., C_out, H_out, W_out), a channels-last view.
    out_c = out_c.reshape(shape).movedim(-1, -3)
    out_r = out_r.reshape(shape).movedim(-1, -3)
    return out_c, out_r
