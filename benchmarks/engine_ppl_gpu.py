"""Engine perplexity on the GPU for checkpoints too large for one device call's carry.

`pack` (CPU machine): for each `quantlab run` folder, measure the engine (CPU reference kernels)
and the simulated model on the run's evaluation windows (benchmarks/engine_accuracy.py), then
split the checkpoint's tensors into compressed blobs, shared across runs where their bytes are
equal (SmolLM2's embedding and lm_head), spread over `--parts` folders of at most the given MB
each, so that successive device calls on one warm machine can carry one folder each.
`run` (device, after every part arrived): rebuild each checkpoint, build its engine on CUDA,
score the same windows and compare with the simulated and CPU-engine perplexity; with `--bench
1,8,32`, also the real model's 128/128 speed per engine, against an fp16 twin of the W8A16
checkpoint (its float weights without the scales).

Usage: python benchmarks/engine_ppl_gpu.py pack out/smollm2_int4_g64_sym ... --parts .pplpack1:38,.pplpack2:58,.pplpack3:58
       python benchmarks/engine_ppl_gpu.py run --parts /tmp/ppl/.pplpack1,... --out $OUT
A carried path does not stay on the device for the next call, but /tmp does: each device call
carries one part and copies it (`mkdir -p /tmp/ppl && cp -r .pplpackN /tmp/ppl/`); the last one
(carrying `.cuda_prebuilt` too, for W4 / W8 kernels) runs `run` on the /tmp copies. The parts
(.pplpack*) are git-ignored through .git/info/exclude.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_accuracy import _nll, measure


def _encode(t: torch.Tensor) -> bytes:
    """zlib bytes of a tensor, 16-bit values split into high and low byte planes first."""
    raw = t.contiguous().view(torch.uint8).numpy()
    if t.element_size() == 2:
        b = raw.reshape(-1, 2)
        return zlib.compress(b[:, 1].tobytes() + b[:, 0].tobytes(), 6)
    return zlib.compress(raw.tobytes(), 6)


def _decode(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    """Inverse of _encode: a tensor of the stored torch dtype name and shape."""
    raw = np.frombuffer(zlib.decompress(data), np.uint8)
    tdtype = getattr(torch, dtype)
    if torch.empty(0, dtype=tdtype).element_size() == 2:
        half = raw.size // 2
        b = np.empty((half, 2), np.uint8)
        b[:, 1], b[:, 0] = raw[:half], raw[half:]
        raw = b.reshape(-1)
    return torch.from_numpy(raw.copy()).view(tdtype).reshape(shape)


def pack(runs: list[Path], parts: list[tuple[Path, float]]) -> None:
    """Measure each run on the CPU, then write its tensors as blobs across the part folders."""
    manifest: dict[str, Any] = {"runs": [], "blobs": {}}
    blobs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            row = measure(run, "cpu", Path(tmp))
            print(json.dumps(row), flush=True)
            spec_windows = _windows(run)
            f = safe_open(str(run / "rank0.safetensors"), "pt")
            tensors = {}
            names = f.keys()
            for name in names:
                a = f.get_tensor(name)
                dtype = str(a.dtype).removeprefix("torch.")
                raw = a.contiguous().view(torch.uint8).numpy().tobytes()
                key = hashlib.sha256(raw + str((dtype, a.shape)).encode()).hexdigest()[:20]
                if key not in blobs:
                    blobs[key] = _encode(a)
                    manifest["blobs"][key] = {"dtype": dtype, "shape": list(a.shape)}
                tensors[name] = key
            manifest["runs"].append(
                {
                    "name": run.name,
                    "config": json.loads((run / "config.json").read_text()),
                    "tensors": tensors,
                    "cpu": row,
                    "windows": spec_windows,
                }
            )
    order = sorted(blobs, key=lambda k: -len(blobs[k]))
    fill = [0.0] * len(parts)
    for key in order:
        mb = len(blobs[key]) / 2**20
        i = next((j for j, (_, cap) in enumerate(parts) if fill[j] + mb <= cap), None)
        if i is None:
            raise SystemExit(f"blob {key} ({mb:.1f} MB) fits no part: raise the part sizes")
        fill[i] += mb
        parts[i][0].mkdir(parents=True, exist_ok=True)
        (parts[i][0] / f"{key}.z").write_bytes(blobs[key])
        manifest["blobs"][key]["part"] = i
    parts[0][0].joinpath("manifest.json").write_text(json.dumps(manifest))
    print("parts (MB):", ", ".join(f"{p}: {m:.1f}" for (p, _), m in zip(parts, fill, strict=True)))


def _windows(run: Path) -> list[list[int]]:
    """Token ids of the run's evaluation windows (lists of ints)."""
    from quantlab.data import DataSpec, load_windows
    from quantlab.export.reload import load_quantized

    summary = json.loads((run / "accuracy.json").read_text())
    _, tok = load_quantized(run / "quantlab")
    return [
        w.tolist() for w in load_windows(DataSpec.model_validate(summary["evaluation_data"]), tok)
    ]


def _sync(device: str) -> None:
    """Wait for the device's queued work (CUDA only)."""
    if device == "cuda":
        torch.cuda.synchronize()


def _rebuild(r: dict[str, Any], manifest: dict[str, Any], parts: list[Path], dest: Path) -> Path:
    """Write run r's checkpoint (config.json + rank0.safetensors) from the blobs into dest."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(r["config"]))
    arrays = {}
    for name, key in r["tensors"].items():
        b = manifest["blobs"][key]
        arrays[name] = _decode((parts[b["part"]] / f"{key}.z").read_bytes(), b["dtype"], b["shape"])
    save_file(arrays, str(dest / "rank0.safetensors"))
    return dest


def _float_twin(ckpt: Path, dest: Path) -> Path:
    """An unquantized checkpoint from a W8A16 one: its float weights (the RTN-rounded values the
    export writes) without the scales; the fp16 baseline of the speed rows, same shapes."""
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg["quantization"]["quant_algo"] != "W8A16":
        raise SystemExit(f"{ckpt.name}: a float twin needs a W8A16 checkpoint")
    cfg["quantization"] = {**cfg["quantization"], "quant_algo": None, "kv_cache_quant_algo": None}
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg))
    f = safe_open(str(ckpt / "rank0.safetensors"), "pt")
    names = [n for n in f.keys() if not n.endswith(".per_channel_scale")]  # noqa: SIM118
    save_file({n: f.get_tensor(n) for n in names}, str(dest / "rank0.safetensors"))
    return dest


def _speed(ckpt: Path, work: Path, device: str, batches: list[int]) -> list[dict[str, Any]]:
    """128/128 static-batch rows of ckpt's engine (CUDA graphs and tuning warmed up first)."""
    from quantlab.engine import bench
    from quantlab.engine.build import build_engine
    from quantlab.engine.config import BuildSettings
    from quantlab.engine.runtime import Engine

    s = BuildSettings(max_batch_size=max(batches), max_input_len=128, max_seq_len=256,
                      max_num_tokens=max(batches) * 128, kv_cache_mem_gb=4.0)  # fmt: skip
    cfg = build_engine(ckpt, work / f"{ckpt.name}-speed", s, show_progress=False)
    e = Engine(work / f"{ckpt.name}-speed", device=device)
    bench.warm_up(e)
    rows = []
    for bs in batches:
        row = bench.bench_static(e, bs, 128, 128)
        rows.append({"run": ckpt.name, "quant_algo": cfg.quant_algo, "kv": cfg.kv_storage,
                     **row.__dict__})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_gpu(
    parts: list[Path], out: Path, device: str = "cuda", batches: list[int] | None = None
) -> None:
    """Rebuild every packed checkpoint, build it, score its windows (ppl_gpu.json); with batches,
    also the 128/128 speed of each engine and of a float twin of the W8A16 one (speed_gpu.json)."""
    from quantlab.engine.build import build_engine
    from quantlab.engine.config import BuildSettings
    from quantlab.engine.runtime import Engine

    manifest = json.loads((parts[0] / "manifest.json").read_text())
    missing = [
        k for k, b in manifest["blobs"].items() if not (parts[b["part"]] / f"{k}.z").exists()
    ]
    if missing:
        raise SystemExit(f"{len(missing)} blobs missing (parts not all carried): {missing[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    rows, speed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in manifest["runs"]:
            ckpt = _rebuild(r, manifest, parts, Path(tmp) / r["name"])
            seq = max(len(w) for w in r["windows"])
            settings = BuildSettings(
                max_batch_size=1, max_input_len=seq, max_seq_len=seq + 1, kv_cache_mem_gb=1.0
            )
            t0 = time.perf_counter()
            cfg = build_engine(
                ckpt, Path(tmp) / f"{r['name']}-engine", settings, show_progress=False
            )
            t_build = time.perf_counter() - t0
            e = Engine(Path(tmp) / f"{r['name']}-engine", device=device)
            e.score(r["windows"][0])  # warm-up: compiles and tunes outside the timing
            _sync(device)
            t0 = time.perf_counter()
            nll = [_nll(e.score(w), torch.tensor(w)) for w in r["windows"]]
            _sync(device)
            n = sum(c for _, c in nll)
            ppl = math.exp(sum(s for s, _ in nll) / n)
            cpu = r["cpu"]
            row = {
                "run": r["name"],
                "quant_algo": cfg.quant_algo,
                "kv": cfg.kv_storage,
                "windows": len(r["windows"]),
                "tokens": n,
                "ppl_engine_gpu": ppl,
                "ppl_engine_cpu": cpu["ppl_engine"],
                "ppl_simulated": cpu["ppl_simulated"],
                "gpu_vs_simulated": ppl / cpu["ppl_simulated"] - 1,
                "gpu_vs_cpu_engine": ppl / cpu["ppl_engine"] - 1,
                "build_seconds": t_build,
                "score_seconds": time.perf_counter() - t0,
                "device": torch.cuda.get_device_name() if device == "cuda" else device,
                "linear_kinds": sorted({v["kind"] for v in cfg.linears.values()}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del e
            if device == "cuda":
                torch.cuda.empty_cache()
            if batches:
                if cfg.quant_algo == "W8A16":
                    twin = _float_twin(ckpt, Path(tmp) / "float-twin")
                    speed += _speed(twin, Path(tmp), device, batches)
                speed += _speed(ckpt, Path(tmp), device, batches)
    (out / "ppl_gpu.json").write_text(json.dumps(rows, indent=1))
    if speed:
        (out / "speed_gpu.json").write_text(json.dumps(speed, indent=1))


def main() -> None:
    """pack | run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("verb", choices=["pack", "run"])
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--parts", required=True, help="pack: DIR:MB,...; run: DIR,...")
    ap.add_argument("--out", default="ppl_gpu")
    ap.add_argument("--device", default="cuda", help="run: cpu for a dry run of the rebuild")
    ap.add_argument(
        "--bench", default="", help="run: batch sizes of 128/128 speed rows, e.g. 1,8,32"
    )
    args = ap.parse_args()
    if args.verb == "pack":
        parts = [(Path(p.split(":")[0]), float(p.split(":")[1])) for p in args.parts.split(",")]
        pack([Path(r) for r in args.runs], parts)
    else:
        batches = [int(b) for b in args.bench.split(",") if b]
        run_gpu([Path(p) for p in args.parts.split(",")], Path(args.out), args.device, batches)


if __name__ == "__main__":
    main()
