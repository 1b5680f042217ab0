"""How often BM25's choice of memory blocks holds the NIAH needle, with blocks that do or do not overlap.

No model runs: the context is tokenized as the harness tokenizes it, the last ``--local`` tokens are the kept
context (ranked with the memory, the in-view gate), the rest is the memory, and ``kvmap.splice.bm25_block_ids``
chooses ``--n-blocks`` blocks of 64 tokens, one starting every 64 tokens (``bm25_blocks=8``) or every
``--stride`` tokens (``bm25_blocks=8:bm25_stride=S``). Printed per part: examples whose needle is in memory, how
many of them the chosen blocks hold, and how many examples with the needle in view import nothing (the gate).

    python docs/checks/bm25_window_coverage.py --part dev --limit 10 20 --part-test-limit 50
"""
import argparse
from types import SimpleNamespace

from kvmap.eval.tasks import niah_examples
from kvmap.models.loading import load_model
from kvmap.splice import bm25_block_ids, block_tokens

BLOCK = 64


def coverage(tok, examples, local: int, n_blocks: int, stride: int) -> tuple[int, int, int, int]:
    in_memory = held = in_view = gated = 0
    for ex in examples:
        ids = tok(ex.context, add_special_tokens=False)["input_ids"]
        texts = [tok.decode([t]) for t in ids[:-local]]
        memory = SimpleNamespace(token_texts=lambda texts=texts: texts, n_tokens=len(texts))
        tail = ids[-local:]
        view = [tok.decode(tail[i:i + BLOCK]) for i in range(0, len(tail), stride or BLOCK)]
        chosen = bm25_block_ids(memory, ex.question, BLOCK, n_blocks, in_view=view, stride=stride)
        candidates = "".join(texts[i] for i in block_tokens(chosen, BLOCK, len(texts), stride).tolist()) \
            if chosen else ""
        if ex.answers[0] in "".join(texts):
            in_memory += 1
            held += ex.answers[0] in candidates
        else:
            in_view += 1
            gated += not chosen
    return in_memory, held, in_view, gated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16000)
    ap.add_argument("--local", type=int, default=4096)
    ap.add_argument("--n-blocks", type=int, default=8)
    ap.add_argument("--dev-limits", type=int, nargs="*", default=[10, 20], help="dev example sets (ids hold the limit)")
    ap.add_argument("--test-limit", type=int, default=50)
    ap.add_argument("--strides", type=int, nargs="*", default=[0, 32, 16])
    args = ap.parse_args()
    tok = load_model().tokenizer
    sets = [("dev", n) for n in args.dev_limits] + ([("test", args.test_limit)] if args.test_limit else [])
    for part, n in sets:
        examples = list(niah_examples(tok, args.length, n, 0, "single", part))
        for stride in args.strides:
            mem, held, view, gated = coverage(tok, examples, args.local, args.n_blocks, stride)
            print(f"{part} n={n} stride={stride or BLOCK}: needle in memory {mem}, held by the chosen blocks {held}; "
                  f"needle in view {view}, nothing imported {gated}")


if __name__ == "__main__":
    main()
