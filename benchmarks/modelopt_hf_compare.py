"""quantlab's modelopt_hf folder against NVIDIA ModelOpt's own export of the same model and format.

Each PAIR is `OURS:THEIRS` (two ModelOpt-HF folders). Prints, per pair: tensor names only in one
folder, tensors whose dtype or shape differ, and the differing fields of hf_quant_config.json's
`quantization` block and of config.json's `quantization_config` (`producer` is reported apart).
Values are not compared: each tool calibrates with its own algorithm.

    python benchmarks/modelopt_hf_compare.py out/smollm2_fp8/modelopt_hf:/tmp/mo/fp8 \
        --out docs/runs/modelopt_hf_compare_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open


def layout(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (safetensors dtype, shape) over every safetensors file of folder."""
    out: dict[str, tuple[str, list[int]]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not a dict
                s = h.get_slice(k)
                out[k] = (s.get_dtype(), list(s.get_shape()))
    return out


def _fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """The layout and config differences of two ModelOpt-HF folders."""
    a, b = layout(ours), layout(theirs)
    hq = [json.loads((p / "hf_quant_config.json").read_text()) for p in (ours, theirs)]
    qc = [
        json.loads((p / "config.json").read_text())["quantization_config"] for p in (ours, theirs)
    ]
    return {
        "ours": str(ours),
        "theirs": str(theirs),
        "quant_algo": hq[0]["quantization"].get("quant_algo"),
        "tensors": len(a),
        "only_ours": sorted(set(a) - set(b)),
        "only_theirs": sorted(set(b) - set(a)),
        "dtype_or_shape_differs": sorted(k for k in set(a) & set(b) if a[k] != b[k]),
        "hf_quant_config_fields_differ": _fields(hq[0]["quantization"], hq[1]["quantization"]),
        "quantization_config_fields_differ": [k for k in _fields(qc[0], qc[1]) if k != "producer"],
        "producer": [hq[0]["producer"], hq[1]["producer"]],
    }


def main() -> None:
    """Compare every pair and print (and optionally write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="OURS:THEIRS folder pairs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [compare(Path(p.split(":")[0]), Path(p.split(":")[1])) for p in args.pairs]
    print(
        "| quant_algo | tensors | only quantlab | only ModelOpt | dtype/shape differ | config fields differ |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        cfg = r["hf_quant_config_fields_differ"] + r["quantization_config_fields_differ"]
        print(
            f"| {r['quant_algo']} | {r['tensors']} | {len(r['only_ours'])} | "
            f"{len(r['only_theirs'])} | {len(r['dtype_or_shape_differs'])} | "
            f"{', '.join(cfg) or 'none (producer apart)'} |"
        )
    if args.out:
        doc = {"date": time.strftime("%Y-%m-%d"), "pairs": rows}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
