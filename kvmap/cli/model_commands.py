"""``kvmap limb``, ``bridge``, ``finetune`` and ``demo``: the limb policy, cross-model adapters, the memory adapter,
the tale demo."""
from __future__ import annotations

from pathlib import Path

from kvmap.cli import checks
from kvmap.errors import InputError


def cmd_limb_train(args) -> int:
    from pathlib import Path

    from kvmap.training.limb import train_limb

    if args.steps < 1:
        raise InputError(f"--steps must be 1 or more, got {args.steps}")
    path = train_limb(Path(args.out).expanduser(), max_steps=args.steps)
    print(f"wrote {path}")
    return 0


def _bridge_parts(args):
    from kvmap.training.bridge import BridgeDataModule, BridgeModule

    for name in ("n_train", "n_val", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    module = BridgeModule(task=args.task, text_model=args.model, target_text_model=args.target_model,
                          limb_checkpoint=args.limb, lr=args.lr, seed=args.seed)
    data = BridgeDataModule(task=args.task, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                            batch_size=args.batch_size, seed=args.seed)
    return module, data


def _print_bridge(metrics: dict) -> None:
    print(f"{metrics['task']}: {metrics['source']} -> {metrics['target']} (chance: {metrics['chance']})")
    for condition, r in metrics["results"].items():
        low, high = r["ci95"]
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in r["by_kind"].items())
        print(f"  {condition:8s} {r['accuracy']:6.1%} [{low:.0%}-{high:.0%}] n={r['n']}  ({kinds})")


def cmd_bridge_train(args) -> int:
    from pathlib import Path

    from kvmap.training.run import evaluate_bridge, train_bridge

    out = Path(args.out or f"runs/bridges/{args.task}")
    module, data = _bridge_parts(args)
    adapter = train_bridge(module, data, out, max_steps=args.steps, val_every=args.val_every)
    module, data = _bridge_parts(args)  # a fresh module: the `random` baseline is the untrained initialisation
    _print_bridge(evaluate_bridge(module, data, adapter, out))
    print(f"wrote {out}/metrics.json, {out}/training.png, {adapter}")
    return 0


def cmd_bridge_eval(args) -> int:
    from pathlib import Path

    from kvmap.training.run import evaluate_bridge

    out = Path(args.out or f"runs/bridges/{args.task}")
    adapter = Path(args.adapter) if args.adapter else out / "adapter.safetensors"
    if not adapter.is_file():  # checked before loading models: a missing adapter must not score the untrained one
        raise InputError(f"no adapter at {adapter}; run `kvmap bridge train --task {args.task}` or pass --adapter FILE")
    module, data = _bridge_parts(args)
    _print_bridge(evaluate_bridge(module, data, adapter, out))
    return 0


def cmd_finetune(args) -> int:
    from pathlib import Path

    from kvmap.models.adapter import AdapterSettings
    from kvmap.training.memory_data import DataSettings
    from kvmap.training.memory_tuning import finetune

    for name in ("steps", "batch_size", "stories", "rank", "val_every", "n_val"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    if not args.lr > 0:
        raise InputError(f"--lr must be above 0, got {args.lr}")
    settings = AdapterSettings(rank=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(",")))
    if not 0 <= args.instruction_in_memory <= 1:
        raise InputError(f"--instruction-in-memory is a share, 0 to 1, got {args.instruction_in_memory}")
    for name in ("babi_share", "fact_share"):
        if not 0 <= getattr(args, name) <= 1:
            raise InputError(f"--{name.replace('_', '-')} is a share, 0 to 1, got {getattr(args, name)}")
    data = DataSettings(n_stories=args.stories, seed=args.seed, instruction_in_memory=args.instruction_in_memory,
                        mode=args.mode, babi_share=args.babi_share, fact_share=args.fact_share)
    folder = finetune(Path(args.out).expanduser(), args.model, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, settings=settings, data_settings=data, n_val=args.n_val, val_every=args.val_every)
    print(f"wrote {folder} (use it with --adapter {folder}); curves in {Path(args.out) / 'training.png'}")
    return 0


def _add_finetune(sub) -> None:
    from kvmap.models.adapter import AdapterSettings
    from kvmap.training.memory_data import DataSettings

    defaults = AdapterSettings()
    f = sub.add_parser("finetune", help="train a memory adapter (LoRA, active only while answering from memory) with "
                                        "memory (imported or spliced) in the forward pass, on FairytaleQA train stories")
    f.add_argument("--out", default="runs/finetune/memory-adapter", help="run folder; a stopped run resumes from it")
    f.add_argument("--model", help="built-in name or local checkpoint folder (default: smollm2-135m)")
    f.add_argument("--steps", type=int, default=500, help="optimizer steps (500)")
    f.add_argument("--batch-size", type=int, default=4, help="examples per step (4)")
    f.add_argument("--lr", type=float, default=5e-4)
    f.add_argument("--rank", type=int, default=defaults.rank, help=f"LoRA rank ({defaults.rank})")
    f.add_argument("--targets", default=",".join(defaults.targets),
                   help="comma-separated linear layers to adapt (never k_proj/v_proj: memories store their output)")
    f.add_argument("--stories", type=int, default=40, help="FairytaleQA train stories in the pool (40; 6 held out)")
    f.add_argument("--n-val", type=int, default=24, help="validation examples (24)")
    f.add_argument("--val-every", type=int, default=50, help="validate and checkpoint every N steps (50)")
    f.add_argument("--instruction-in-memory", type=float, default=0.0,
                   help="share of fact examples whose memory starts with the instruction, as NIAH's context does (0)")
    f.add_argument("--mode", choices=("import", "splice"), default="import",
                   help="answer from the seed's token-level import (import, the default) or from the BM25-chosen blocks "
                        "spliced into the prompt, as `kvmap ask` answers (splice)")
    f.add_argument("--babi-share", type=float, default=0.0,
                   help="share of examples with bAbI qa1/qa2 *train* facts planted in a story (0)")
    f.add_argument("--fact-share", type=float, default=DataSettings.fact_share,
                   help=f"share of planted-fact examples among the others; the rest are FairytaleQA train questions "
                        f"({DataSettings.fact_share})")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_finetune)


def cmd_demo(args) -> int:
    from kvmap.demo import run_demo

    if args.tales < 1:
        raise InputError(f"--tales must be 1 or more, got {args.tales}")
    if args.memory:
        checks.memory_folder(args.memory, create=True)
    if args.record and (Path(args.record).is_dir() or any(p.exists() and not p.is_dir()
                                                          for p in Path(args.record).parents)):
        raise InputError(f"--record {args.record}: give a JSON file path whose folders are folders "
                         "(e.g. runs/demo/demo.json)")
    return run_demo(memory_dir=args.memory, n_tales=args.tales, rebuild=args.rebuild, adapter=args.adapter,
                    record=args.record)


def _add_bridge(sub) -> None:
    br = sub.add_parser("bridge", help="cross-model memory: train and evaluate adapters between two models")
    brsub = br.add_subparsers(dest="bridge_command", required=True)
    for name, func, help in (("train", cmd_bridge_train, "train an adapter, then evaluate it against its baselines"),
                             ("eval", cmd_bridge_eval, "evaluate a trained adapter against its baselines")):
        bp = brsub.add_parser(name, help=help)
        bp.add_argument("--task", required=True, choices=["vision-text", "text-limb", "text-text"])
        bp.add_argument("--out", help="run folder (runs/bridges/TASK)")
        bp.add_argument("--model", default="smollm2-135m", help="the text model (smollm2-135m)")
        bp.add_argument("--target-model", default="gemma3-270m", help="text-text: the importing model (gemma3-270m)")
        bp.add_argument("--limb", default="~/.cache/kvmap/limb/limb.ckpt", help="limb policy checkpoint")
        bp.add_argument("--n-train", type=int, default=1200)
        bp.add_argument("--n-val", type=int, default=48)
        bp.add_argument("--n-test", type=int, default=200)
        bp.add_argument("--batch-size", type=int, default=8)
        bp.add_argument("--lr", type=float, default=1e-3)
        bp.add_argument("--seed", type=int, default=0)
        if name == "train":
            bp.add_argument("--steps", type=int, default=150, help="optimizer steps (150)")
            bp.add_argument("--val-every", type=int, default=50)
        else:
            bp.add_argument("--adapter", help="adapter file (default: OUT/adapter.safetensors)")
        bp.set_defaults(func=func)


def add_parsers(sub) -> None:
    lb = sub.add_parser("limb", help="the vision/limb-control policy (a timm ViT on a synthetic arm world)")
    lbsub = lb.add_subparsers(dest="limb_command", required=True)
    lt = lbsub.add_parser("train", help="train the limb policy with Lightning on this CPU")
    lt.add_argument("--out", default="~/.cache/kvmap/limb", help="folder for limb.ckpt and logs (~/.cache/kvmap/limb)")
    lt.add_argument("--steps", type=int, default=700, help="optimizer steps (700: ~97%% reach accuracy, ~10 min on one CPU core)")
    lt.set_defaults(func=cmd_limb_train)
    _add_bridge(sub)
    _add_finetune(sub)
    d = sub.add_parser("demo", help="fairy tales into memory, questions answered from it")
    d.add_argument("--memory", help="memory folder (default: $KVMAP_CACHE/demo-memory)")
    d.add_argument("--tales", type=int, default=28, help="how many Grimm tales to remember (28, about 63k tokens)")
    d.add_argument("--rebuild", action="store_true", help="read the tales again")
    d.add_argument("--adapter", help="a memory adapter folder (`kvmap finetune`) for the token-level answers")
    d.add_argument("--record", help="also write the answers and scores to this JSON file (runs/demo/demo.json "
                   "is the one RESULTS.md quotes)")
    d.set_defaults(func=cmd_demo)
