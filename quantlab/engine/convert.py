"""Checkpoint linear tensors (TensorRT-LLM names, quantlab's export) -> engine linears in kernel layouts.

One engine linear is (meta, tensors): meta["kind"] is float | w8a16 | w4a16 | fp8 | w8a8, and the
tensors are what the kernel op of that kind takes (quantlab.kernels.linear_*), converted once here
so the runtime does no layout work. Every conversion is exact: codes are recovered by rounding
(checked), never re-quantized from floats.
"""

from __future__ import annotations

from typing import Any

import torch

from quantlab.errors import InputError
from quantlab.kernels.packing import pack_int4_rows, to_wgmma_layout

Linear = tuple[dict[str, Any], dict[str, torch.Tensor]]
KERNEL_GROUPS = (128, 64, 32)  # group sizes the CUDA W4 kernels serve


def _codes(w: torch.Tensor, s: torch.Tensor, lo: int, hi: int, where: str) -> torch.Tensor:
    """Integer codes round(w / s) [N, K] (s broadcast over K), checked to be codes of w.

    w is q * s rounded to the checkpoint dtype, so w / s lies within 0.06 of an integer (fp16:
    127 * 2^-11); farther than 0.25 means the weight was never on this grid.
    """
    r = w.float() / s.float()
    q = torch.round(r).clamp(lo, hi)
    off = float((r - q).abs().max()) if w.numel() else 0.0
    if off > 0.25:
        raise InputError(
            f"{where}: the float weight is not on the grid of its per_channel_scale (w / s is up "
            f"to {off:.3g} from an integer code); the checkpoint was not written by quantlab's "
            "W8A16/W4A16 export."
        )
    return q.to(torch.int8)


def _bias(t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"bias": t["bias"].to(dtype)} if "bias" in t else {}


def _prequant(t: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The AWQ / ModelOpt pre-quant scale [K] (multiplies x), dropped when it is all ones."""
    pre = t.get(key)
    if pre is None or bool((pre.float() == 1).all()):
        return {}
    return {"pre_quant_scale": pre.reshape(-1).to(dtype)}


def to_layout(lin: Linear, layout: str) -> Linear:
    """A W4 linear's weight moved to the Hopper layout (N, K multiples of 16); others unchanged."""
    meta, t = lin
    if meta["kind"] != "w4a16" or layout != "hopper":
        return lin
    n, k = t["qweight"].shape[0] * 2, t["qweight"].shape[1]
    if n % 16 or k % 16:
        return lin
    return {**meta, "layout": "hopper"}, {
        **t,
        "qweight": to_wgmma_layout(t["qweight"]).contiguous(),
    }


def _int8_groups(t: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> Linear:
    """W8A16_GPTQ as codes int8 [N, K], scales [N, K/G] and (asymmetric) zero points int8
    [N, K/G] with w = (q - zp) * s; the checkpoint's float zero (128 - z) * s gives zp = z - 128."""
    s = t["weights_scaling_factor"].float()  # [K/G, N]
    meta = {"kind": "w8a16_group", "group_size": t["weight"].shape[1] // s.shape[0]}
    out = {"qweight": t["weight"].contiguous(), "scales": s.t().to(dtype).contiguous()}
    if "zero" in t:
        z = 128.0 - t["zero"].float() / s
        zr = torch.round(z)
        if float((z - zr).abs().max()) > 0.25:
            raise InputError(
                f"{where}: the W8A16_GPTQ zero is not (128 - z) * scale for an integer z; the "
                "checkpoint was not written by quantlab's export."
            )
        out["zeros"] = (zr - 128).to(torch.int8).t().contiguous()
    return meta, {**out, **_bias(t, dtype)}


def convert_linear(
    t: dict[str, torch.Tensor],
    algo: str | None,
    group_size: int,
    dtype: torch.dtype,
    where: str,
    int8_groups: bool = False,
) -> Linear:
    """Engine linear from one checkpoint linear's tensors (weight, scales, ...; see docs/export.md).

    W8A16_GPTQ stays int8 codes (kind w8a16_group, linear_w8a16_group's operands) where the group
    is a power of two >= 16; int8_groups keeps the codes for any group (the ONNX export's blocked
    DequantizeLinear takes every block size)."""
    w = t["weight"]
    quantized = any(
        k in t for k in ("per_channel_scale", "weights_scaling_factor", "act_scale", "zero")
    )
    if algo is None or not quantized:  # unquantized or listed in exclude_modules
        return {"kind": "float"}, {"weight": w.to(dtype).contiguous(), **_bias(t, dtype)}
    if algo in ("W8A16", "W4A16"):
        s = t["per_channel_scale"].reshape(-1)
        bits = 8 if algo == "W8A16" else 4
        lo, hi = (-128, 127) if bits == 8 else (-8, 7)
        q = _codes(w, s.reshape(-1, 1), lo, hi, where)
        if bits == 8:
            return {"kind": "w8a16"}, {"qweight": q, "scales": s.to(dtype), **_bias(t, dtype)}
        k = q.shape[1]
        # Per-channel int4 runs as group-wise with one scale repeated over the groups (same math);
        # the CUDA kernels serve groups 32/64/128 only.
        g = next((gs for gs in KERNEL_GROUPS if k % gs == 0), k)
        scales = s.reshape(-1, 1).expand(-1, k // g).to(dtype).contiguous()
        meta = {"kind": "w4a16", "group_size": g, "layout": "checkpoint"}
        return meta, {"qweight": pack_int4_rows(q), "scales": scales, **_bias(t, dtype)}
    if algo == "W4A16_AWQ":
        meta = {"kind": "w4a16", "group_size": group_size, "layout": "checkpoint"}
        tensors = {
            "qweight": w.contiguous(),
            "scales": t["weights_scaling_factor"].to(dtype).contiguous(),
            **_prequant(t, "prequant_scaling_factor", dtype),
            **_bias(t, dtype),
        }
        return meta, tensors
    if algo == "W4A16_GPTQ":
        s = t["weights_scaling_factor"].t().contiguous()  # [K/G, N] -> [N, K/G]
        # The export stores zero = (8 - z) * s (TensorRT-LLM's runtime convention); the kernels
        # take the integer zero point z.
        z = 8.0 - torch.round(t["zero"].t().float() / s.float())
        if bool((z < 0).any() or (z > 15).any()):
            raise InputError(f"{where}: zero points outside [0, 15]; the checkpoint is damaged.")
        meta = {"kind": "w4a16", "group_size": group_size, "layout": "checkpoint"}
        tensors = {
            "qweight": w.contiguous(),
            "scales": s.to(dtype),
            "zeros": z.to(torch.uint8).contiguous(),
            **_bias(t, dtype),
        }
        return meta, tensors
    if algo == "W8A16_GPTQ":
        g = w.shape[1] // t["weights_scaling_factor"].shape[0]
        if int8_groups or (g >= 16 and g & (g - 1) == 0):
            return _int8_groups(t, dtype, where)
        # linear_w8a16_group serves power-of-two groups >= 16 only: dequantize once at build time
        # and run the float GEMM (correct, no weight-memory saving; said in config.json).
        s = t["weights_scaling_factor"].float()  # [K/G, N]
        wf = w.float() * s.t().repeat_interleave(g, dim=1)
        if "zero" in t:
            wf = wf + t["zero"].float().t().repeat_interleave(g, dim=1)
        meta = {"kind": "float", "dequantized_from": "W8A16_GPTQ"}
        return meta, {"weight": wf.to(dtype).contiguous(), **_bias(t, dtype)}
    if algo == "FP8":
        meta = {"kind": "fp8", "granularity": "tensor"}
        tensors = {
            "weight": w.contiguous(),
            "weight_scale": t["weights_scaling_factor"].float().reshape(1),
            "x_scale": t["activation_scaling_factor"].float().reshape(1),
            **_bias(t, dtype),
        }
        return meta, tensors
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        meta = {"kind": "fp8", "granularity": "row"}
        tensors = {
            "weight": w.contiguous(),
            "weight_scale": t["per_channel_scale"].float().reshape(-1),
            **_bias(t, dtype),
        }
        return meta, tensors
    if algo.startswith("W8A8_SQ"):
        return _convert_sq(t, algo, dtype, where)
    raise InputError(f"{where}: quant_algo {algo} has no engine linear.")  # pragma: no cover


def _convert_sq(t: dict[str, torch.Tensor], algo: str, dtype: torch.dtype, where: str) -> Linear:
    """SmoothQuant W8A8: int8 weight [N, K], weight scale [N] fp32, static x scale [1] or per-token."""
    w = t["weight"]
    n = w.shape[0]
    if algo == "W8A8_SQ_PER_CHANNEL":  # ModelOpt flow
        ws = t["weights_scaling_factor"].float().reshape(-1)
        xs: torch.Tensor | None = t["activation_scaling_factor"].float().reshape(1)
        extra = _prequant(t, "prequant_scaling_factor", dtype)
    else:  # plugin flow
        ws = t["per_channel_scale"].float().reshape(-1)
        xs = t["act_scale"].float().reshape(1) if "act_scale" in t else None
        extra = {}
        sm = t.get("smoother")
        if sm is not None and not bool((sm.float() == 1).all()):
            raise InputError(
                f"{where}: a smoother other than ones is not supported; quantlab's export folds the "
                "smoothing into the weights and writes ones."
            )
    if ws.numel() == 1:
        ws = ws.expand(n).contiguous()
    meta = {"kind": "w8a8", "per_token": xs is None}
    tensors = {"qweight": w.contiguous(), "weight_scale": ws, **extra, **_bias(t, dtype)}
    if xs is not None:
        tensors["x_scale"] = xs
    return meta, tensors


def fuse(parts: list[Linear]) -> Linear | None:
    """One linear computing parts' outputs concatenated along N, or None when they cannot fuse.

    They fuse when kind, layout, group and every per-tensor scale agree (an FP8 gate and up with
    different scales stay two GEMMs); N-indexed tensors are concatenated.
    """
    metas = [m for m, _ in parts]
    if any(m != metas[0] for m in metas) or metas[0].get("layout") == "hopper":
        return None  # fuse before to_layout: the Hopper layout is not row-concatenable
    ts = [t for _, t in parts]
    if any(set(t) != set(ts[0]) for t in ts):
        return None
    out: dict[str, torch.Tensor] = {}
    for key in ts[0]:
        vals = [t[key] for t in ts]
        if key in ("x_scale", "pre_quant_scale") or (
            key == "weight_scale" and metas[0].get("granularity") == "tensor"
        ):
            if any(not torch.equal(v, vals[0]) for v in vals):
                return None
            out[key] = vals[0]
        else:
            out[key] = torch.cat(vals, dim=0).contiguous()
    return metas[0], out
