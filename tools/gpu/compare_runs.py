#!/usr/bin/env python3
"""Compare two sdbooth training runs (e.g. CUDA against CPU): loss curves and final weights.

    compare_runs.py --init init.safetensors --a cuda/tiny.safetensors --b cpu/tiny.safetensors \
        --loss-a cuda/tiny.jsonl --loss-b cpu/tiny.jsonl [--json out.json]

Prints one line: the largest per-step loss difference, and the weights' difference relative to
how far training moved them: ||a - b|| / ||b - init|| over all tensors (0: identical runs; 1: the
runs differ as much as training changed the weights). Standard library only, so it runs on the
GPU machine (no Rust there) and here alike. Exit status 1 when a bound is exceeded.
"""

import argparse
import array
import json
import math
import struct
import sys

# A 50-step f32 run compounds rounding differences through AdamW's normalised updates; these
# bounds accept that drift and fail a wrong gradient or a device mix-up, which move the weights
# as much as training does (relative difference near 1).
LOSS_BOUND = 2e-2
WEIGHT_BOUND = 5e-2


def bf16_to_f32(raw: bytes) -> array.array:
    halves = array.array("H")
    halves.frombytes(raw)
    out = array.array("I", (h << 16 for h in halves))
    return array.array("f", out.tobytes())


def load_safetensors(path: str) -> dict:
    """name -> array('f') of the values, for F32, F16 and BF16 tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = data[start:end]
        dtype = meta["dtype"]
        if dtype == "F32":
            values = array.array("f")
            values.frombytes(raw)
        elif dtype == "F16":
            values = array.array("f", struct.unpack(f"<{len(raw) // 2}e", raw))
        elif dtype == "BF16":
            values = bf16_to_f32(raw)
        else:
            continue  # integer buffers (position ids) are not trained
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = values
    return out


def load_losses(path: str) -> dict:
    losses = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                losses[rec["step"]] = rec["loss"]
    return losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True)
    p.add_argument("--a", required=True, help="the run under test (e.g. CUDA)")
    p.add_argument("--b", required=True, help="the baseline run (e.g. CPU)")
    p.add_argument("--loss-a", required=True)
    p.add_argument("--loss-b", required=True)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    la, lb = load_losses(args.loss_a), load_losses(args.loss_b)
    steps = sorted(set(la) & set(lb))
    if not steps or len(steps) != len(lb):
        print(f"loss logs cover different steps: {len(la)} vs {len(lb)}")
        return 1
    loss_diff = max(abs(la[s] - lb[s]) for s in steps)

    init, a, b = load_safetensors(args.init), load_safetensors(args.a), load_safetensors(args.b)
    if set(a) != set(b):
        print(f"the two models hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
        return 1
    diff2 = moved2 = 0.0
    max_abs = 0.0
    for name in a:
        va, vb = a[name], b[name]
        vi = init.get(name)
        if len(va) != len(vb) or (vi is not None and len(vi) != len(vb)):
            print(f"{name}: sizes differ")
            return 1
        for k in range(len(vb)):
            d = va[k] - vb[k]
            diff2 += d * d
            max_abs = max(max_abs, abs(d))
            if vi is not None:
                m = vb[k] - vi[k]
                moved2 += m * m
    if not all(math.isfinite(x) for x in (diff2, moved2, loss_diff)):
        print("non-finite values in the runs")
        return 1
    rel = math.sqrt(diff2) / max(math.sqrt(moved2), 1e-30)
    ok = loss_diff <= LOSS_BOUND and rel <= WEIGHT_BOUND
    figures = {
        "steps": len(steps),
        "final_loss_a": la[steps[-1]],
        "final_loss_b": lb[steps[-1]],
        "max_loss_diff": loss_diff,
        "loss_bound": LOSS_BOUND,
        "weights_max_abs_diff": max_abs,
        "weights_rel_to_update": rel,
        "weights_bound": WEIGHT_BOUND,
        "passed": ok,
    }
    print(
        f"{len(steps)} steps: final loss {la[steps[-1]]:.5f} vs {lb[steps[-1]]:.5f}, largest loss "
        f"difference {loss_diff:.2e} (bound {LOSS_BOUND:.0e}); weights ‖a−b‖/‖b−init‖ {rel:.2e} "
        f"(bound {WEIGHT_BOUND:.0e}), largest weight difference {max_abs:.2e}: {'ok' if ok else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
