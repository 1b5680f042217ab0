"""What int8 K/V with per-channel scales would cost, measured on a real memory (stored float16).

For sampled layers, each (segment, KV head, channel) of keys and values is quantized symmetrically to
int8 (scale = max |x| / 127) and dequantized. FairytaleQA questions' rotated queries (recorded from
the real import path, as in ``recall_real_kv.py``) then search both versions exactly; we report
recall@k of the int8 search against the float16 one (ties count) and the relative error of the
memory part of attention: softmax over the top-k logits, times the values, int8 against float16.
Writes runs/scale/quantization.json.

    python benchmarks/quantization_cost.py --memory ~/.cache/kvmap/scale/tales-1m
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from recall_real_kv import _RecordingMemory, questions, tie_aware_recall  # noqa: E402

from kvmap.fileio import write_json_atomic  # noqa: E402
from kvmap.models.loading import load_model  # noqa: E402
from kvmap.ports import ImportConfig  # noqa: E402
from kvmap.stores import Memory  # noqa: E402


def int8_roundtrip(x: np.ndarray) -> np.ndarray:
    """Symmetric per-channel int8 quantization of (n, H, d) and back, as float32."""
    x = x.astype(np.float32)
    scale = np.abs(x).max(axis=0, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(x / scale), -127, 127) * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", required=True)
    ap.add_argument("--max-tokens", type=int, default=200_000, help="use the first segments up to this many tokens")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default="runs/scale/quantization.json")
    args = ap.parse_args()
    lm = load_model()
    memory = Memory.open(args.memory, expect_model_id=lm.model_id, verify=False)
    sizes, n = [], 0  # the first segments, up to --max-tokens
    for size in memory.segment_sizes():
        if n >= args.max_tokens:
            break
        sizes.append(size)
        n += size
    recorder = _RecordingMemory(memory)
    with torch.no_grad(), lm.port.importing(recorder, ImportConfig.from_options(top_k=args.k)):
        for q in questions(lm.tokenizer, args.questions):
            lm.model(lm.tokenizer(f"Question: {q}\nAnswer:", return_tensors="pt").input_ids)
    rows = []
    scale = lm.port.attentions[0].scaling
    for layer in [int(x) for x in args.layers.split(",")]:
        queries = torch.cat(recorder.queries[layer], dim=1)  # (H, M, d)
        stored = [memory.segment_kv(i, layer) for i in range(len(sizes))]  # (n, H, d) each
        k16 = np.concatenate([np.asarray(k, dtype=np.float16) for k, _ in stored])
        v16 = np.concatenate([np.asarray(v, dtype=np.float16) for _, v in stored])
        bounds = np.cumsum([0] + sizes)
        k8 = np.concatenate([int8_roundtrip(k16[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        v8 = np.concatenate([int8_roundtrip(v16[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        out = {}
        for name, keys, values in (("float16", k16, v16), ("int8", k8, v8)):
            kt = torch.from_numpy(keys.astype(np.float32)).transpose(0, 1)  # (H, N, d)
            vt = torch.from_numpy(values.astype(np.float32)).transpose(0, 1)
            top, ids = torch.einsum("hmd,hnd->hmn", queries, kt).topk(args.k, dim=-1)
            probs = torch.softmax(top * scale, dim=-1)
            picked = vt.gather(1, ids.flatten(1)[..., None].expand(-1, -1, vt.shape[-1])).view(*ids.shape, -1)
            out[name] = (ids, torch.einsum("hmk,hmkd->hmd", probs, picked), top)
        k16t = torch.from_numpy(k16.astype(np.float32)).transpose(0, 1)
        recall = tie_aware_recall(queries, k16t, out["int8"][0], out["float16"][2][..., -1]).item()
        err = ((out["int8"][1] - out["float16"][1]).norm(dim=-1) / out["float16"][1].norm(dim=-1)).median().item()
        rows.append({"layer": layer, "recall_int8_vs_fp16": recall, "median_relative_output_error": err,
                     "n_queries": int(queries.shape[1])})
        print(json.dumps(rows[-1]), flush=True)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model": lm.model_id, "n_tokens": int(n)},
              "mean_recall": float(np.mean([r["recall_int8_vs_fp16"] for r in rows])),
              "median_output_error": float(np.median([r["median_relative_output_error"] for r in rows])),
              "bytes_per_token": {"float16": 2 * memory.layout.n_layers * memory.layout.n_kv_heads * memory.layout.head_dim * 2,
                                  "int8": 2 * memory.layout.n_layers * memory.layout.n_kv_heads * memory.layout.head_dim},
              "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
