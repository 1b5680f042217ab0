"""Linear probes on the limb policy's exported K/V: what a vision -> text adapter could read at best.

For each ViT block, a logistic-regression probe reads the block's exported keys and values (mean
over tokens, and the class token's) of scenes seen with no instruction, and predicts each
vision-text question's answer (nearest colour, pointing left/right). Trained on the bridge's train
split, scored on its test split. Writes runs/bridges/probe/metrics.json.

    python benchmarks/probe_limb_kv.py [--limb ~/.cache/kvmap/limb/limb.ckpt]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from kvmap.bridges.tasks import make_examples
from kvmap.fileio import write_json_atomic
from kvmap.stores.tensor import recording
from kvmap.training.limb import load_limb


def features(policy, examples) -> dict[int, torch.Tensor]:
    """Per block: (B, F) mean-over-tokens and class-token K and V, every head."""
    images = torch.stack([ex.image for ex in examples])
    with torch.no_grad(), recording(policy.port()) as kv:
        policy(images, torch.zeros(len(examples), dtype=torch.long))
    return {layer: torch.cat([k.mean(2).flatten(1), v.mean(2).flatten(1), k[:, :, 0].flatten(1), v[:, :, 0].flatten(1)], 1)
            for layer, (k, v) in kv.items()}  # k, v: (B, H, T, d)


def probe(x_train, y_train, x_test, y_test, n_classes: int, l2: float = 1e-2) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (standardised features, L-BFGS)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    linear = torch.nn.Linear(x_train.shape[1], n_classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x_train), y_train) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limb", default="~/.cache/kvmap/limb/limb.ckpt")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--out", default="runs/bridges/probe/metrics.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    policy = load_limb(Path(args.limb).expanduser()).eval()
    train, test = make_examples("vision-text", args.n_train, 0), make_examples("vision-text", args.n_test, 2)
    result = {"limb": args.limb, "n_train": args.n_train, "n_test": args.n_test, "accuracy": {}}
    for kind in ("nearest", "pointing"):
        a, b = [e for e in train if e.kind == kind], [e for e in test if e.kind == kind]
        fa, fb = features(policy, a), features(policy, b)
        ya, yb = torch.tensor([e.answer for e in a]), torch.tensor([e.answer for e in b])
        result["accuracy"][kind] = {str(layer): probe(fa[layer], ya, fb[layer], yb, len(a[0].choices)) for layer in sorted(fa)}
        print(kind, {k: round(v, 2) for k, v in result["accuracy"][kind].items()}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
