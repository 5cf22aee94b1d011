"""Print a short summary of the JSON rows a device call wrote under OUT (check, speed, profile)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    """One line per check mode, speed mode and profile row."""
    for f in sorted(Path(sys.argv[1]).rglob("*rows.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            st, err = r.get("stage"), r.get("error", "")[:300]
            if st == "check":
                print("check", r.get("mode", "")[:32], r.get("ok"), r.get("engine_rel_err"),
                      r.get("fp16_sim_rel_err"), r.get("decode_vs_prefill_mismatches"), err)  # fmt: skip
            elif st == "speed":
                rows = [(x["batch_size"], round(x["tokens_per_s"], 1)) for x in r.get("rows", [])]
                print("speed", r.get("mode", "")[:32], rows, err)
                if "rows_no_lookahead" in r:
                    off = [(x["batch_size"], round(x["tokens_per_s"], 1))
                           for x in r["rows_no_lookahead"]]  # fmt: skip
                    print("speed (look-ahead off)", r.get("mode", "")[:32], off)
            elif st in ("profile", "bw", "hf", "kvfit", "trace", "breakdown"):
                keep = {k: v for k, v in r.items() if k not in ("top_kernels", "stage")}
                print(st, json.dumps(keep)[:400])


if __name__ == "__main__":
    main()
