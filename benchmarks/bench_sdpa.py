"""torch's SDPA kernels (flash, cuDNN, memory-efficient) on a DiT family's self-attention shape, with and
without an additive key mask (Qwen-Image's caption mask), as ``SdpaChoice`` times them when it picks one
(omni_ray/dit/families/sdpa_choice.py).

    python benchmarks/bench_sdpa.py                      # Qwen-Image: 24 heads x 128, 512 and 1024 px, 16 rows
                                                         # (masked rows: "split" too, 128 caption tokens)
    python benchmarks/bench_sdpa.py --heads 40 --tokens 14040 32760 --rows 2    # Wan2.1-14B, 33 / 81 frames

Results: benchmarks/results/sdpa_cuda.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table, write_result  # noqa: E402
from omni_ray.dit.families.sdpa_choice import CANDIDATES, time_backends  # noqa: E402
from omni_ray.dit.families.split_attention import merge, split_caption_attention  # noqa: E402

NAMES = (*CANDIDATES, "split")        # split: cuDNN unmasked over the image keys + masked over the caption's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1152, 4224], help="joint tokens (text + image)")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--text-tokens", type=int, default=128,
                    help="masked rows: the caption prefix the mask covers; also times the split attention over it")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sdpa needs a CUDA GPU")
    fused_merge = torch.compile(merge)            # as the engine runs it (fuse_elementwise)

    def split(q, k, v, bias, text_len):
        return split_caption_attention(q, k, v, bias, text_len, fused_merge)

    rows = []
    for r in a.rows:
        for n in a.tokens:
            for masked in (False, True):
                ms = time_backends(r, a.heads, n, a.head_dim, masked=masked, reps=10,
                                   prefix=a.text_tokens or None, split=split)
                ms.setdefault("split", float("inf"))
                flops = 4 * r * a.heads * n * n * a.head_dim
                row = {"rows": r, "tokens": n, "mask": masked}
                for name in NAMES:
                    row[f"{name}_ms"] = ms[name] if ms[name] != float("inf") else None
                    row[f"{name}_tflops"] = flops / ms[name] / 1e9 if ms[name] != float("inf") else None
                rows.append(row)
    cols = ["rows", "tokens", "mask"] + [f"{n}_{u}" for n in NAMES for u in ("ms", "tflops")]
    print(table(rows, cols))
    print(write_result("sdpa_cuda.json", {"heads": a.heads, "head_dim": a.head_dim, "rows": rows}))


if __name__ == "__main__":
    main()
