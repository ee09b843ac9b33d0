#!/usr/bin/env python3
"""Golden fixtures for sdbooth-ops: PyTorch outputs and gradients for every op.

For each case we store, in one safetensors file,
    {case}.in.{name}    inputs (float64 rounded to float32, or int64 ids)
    {case}.out          forward output
    {case}.g            random upstream gradient g
    {case}.grad.{name}  d/d{name} of the scalar loss (out * g).sum()
Op parameters (stride, eps, groups, causal, ...) are fixed per case and repeated in
crates/sdbooth-ops/tests/golden.rs.

Everything is computed in float64 from float32-representable inputs, then stored as float32, so
the fixture is the exact answer up to one f32 rounding; the Rust test compares with norm-relative
error (outputs <= 1e-5, gradients <= 1e-4).

Run (from the repository root; the CPU build of torch is enough):
    tools/.venv/bin/python tools/goldens/ops.py
writes crates/sdbooth-ops/tests/fixtures/ops.safetensors (a few hundred KB).
"""

import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(1234)
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "sdbooth-ops", "tests", "fixtures",
                   "ops.safetensors")

tensors = {}


def randn(*shape):
    # f32-representable values, computed on in f64.
    return torch.randn(*shape, dtype=torch.float32).to(torch.float64)


def case(name, fn, inputs, grad_names=None):
    """Run fn(**inputs) in f64; store inputs, output, g and the gradients of (out * g).sum()."""
    leaves = {}
    for k, v in inputs.items():
        if v.is_floating_point():
            leaves[k] = v.clone().requires_grad_(grad_names is None or k in grad_names)
        else:
            leaves[k] = v
    out = fn(**leaves)
    g = randn(*out.shape)
    if any(v.is_floating_point() and v.requires_grad for v in leaves.values()):
        (out * g).sum().backward()
    for k, v in leaves.items():
        tensors[f"{name}.in.{k}"] = v.detach().to(torch.float32) if v.is_floating_point() else v
        if v.is_floating_point() and v.grad is not None:
            tensors[f"{name}.grad.{k}"] = v.grad.to(torch.float32)
    tensors[f"{name}.out"] = out.detach().to(torch.float32)
    tensors[f"{name}.g"] = g.to(torch.float32)


def conv(stride, padding):
    return lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding)


case("conv3x3_s1", conv(1, 1), dict(x=randn(2, 4, 7, 6), w=randn(5, 4, 3, 3) * 0.3, b=randn(5)))
case("conv3x3_s2", conv(2, 1), dict(x=randn(2, 4, 9, 8), w=randn(6, 4, 3, 3) * 0.3, b=randn(6)))
case("conv3x3_s2_odd", conv(2, 1), dict(x=randn(1, 3, 7, 5), w=randn(4, 3, 3, 3) * 0.3, b=randn(4)))
case("conv1x1", conv(1, 0), dict(x=randn(2, 6, 5, 5), w=randn(3, 6, 1, 1) * 0.3, b=randn(3)))
case("linear", lambda x, w, b: F.linear(x, w, b), dict(x=randn(2, 3, 8), w=randn(5, 8) * 0.3, b=randn(5)))
case("group_norm", lambda x, gamma, beta: F.group_norm(x, 4, gamma, beta, eps=1e-5),
     dict(x=randn(2, 8, 5, 4) * 2 + 0.5, gamma=randn(8), beta=randn(8)))
case("group_norm_silu", lambda x, gamma, beta: F.silu(F.group_norm(x, 4, gamma, beta, eps=1e-6)),
     dict(x=randn(2, 8, 5, 4) * 2 + 0.5, gamma=randn(8), beta=randn(8)))
case("layer_norm", lambda x, gamma, beta: F.layer_norm(x, (16,), gamma, beta, eps=1e-5),
     dict(x=randn(2, 5, 16) * 2 - 0.3, gamma=randn(16), beta=randn(16)))
case("softmax", lambda x: torch.softmax(x, dim=-1), dict(x=randn(3, 4, 10) * 2))


def attn(causal):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


case("attention", attn(False), dict(q=randn(2, 3, 17, 8), k=randn(2, 3, 17, 8), v=randn(2, 3, 17, 8)))
case("attention_causal", attn(True), dict(q=randn(2, 3, 17, 8), k=randn(2, 3, 17, 8), v=randn(2, 3, 17, 8)))
case("attention_cross", attn(False), dict(q=randn(1, 2, 33, 8), k=randn(1, 2, 7, 8), v=randn(1, 2, 7, 8)))
# Longer than one query tile (64 rows) of the CPU kernel; key tiles (256) are crossed in the
# f64-reference test of tests/grad.rs.
case("attention_long", attn(False), dict(q=randn(1, 2, 150, 16), k=randn(1, 2, 150, 16), v=randn(1, 2, 150, 16)))
case("attention_long_causal", attn(True),
     dict(q=randn(1, 2, 150, 16), k=randn(1, 2, 150, 16), v=randn(1, 2, 150, 16)))
case("gelu_erf", lambda x: F.gelu(x), dict(x=randn(4, 33) * 2))
case("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x), dict(x=randn(4, 33) * 2))
case("silu", lambda x: F.silu(x), dict(x=randn(4, 33) * 2))


def geglu(x):
    value, gate = x.chunk(2, dim=-1)
    return value * F.gelu(gate)


case("geglu", geglu, dict(x=randn(3, 5, 24)))
case("embedding", lambda ids, table: F.embedding(ids, table),
     dict(ids=torch.tensor([[0, 3, 10, 3, 7], [1, 1, 2, 9, 0]], dtype=torch.int64), table=randn(11, 6)))
case("upsample", lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), dict(x=randn(1, 3, 4, 5)))


def timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift):
    # diffusers.models.embeddings.get_timestep_embedding (max_period 10000, scale 1), restated
    # here so the script needs only torch.
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = t[:, None].to(torch.float64) * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


ts = torch.tensor([0.0, 1.0, 250.0, 999.0], dtype=torch.float64)
case("timestep_sd", lambda t: timestep_embedding(t, 32, True, 0.0), dict(t=ts), grad_names=[])
case("timestep_odd", lambda t: timestep_embedding(t, 31, False, 1.0), dict(t=ts), grad_names=[])

os.makedirs(os.path.dirname(OUT), exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT)
print(f"wrote {len(tensors)} tensors to {os.path.normpath(OUT)}")
