"""LoRA vs full finetuning: banking77 on a small pretrained base, and the per-device memory of llama_8b.

    python -m tools.bench_lora banking77 --work /tmp/bench_lora [--pretrain-steps 200 --steps 150]
    python -m tools.bench_lora memory [--config configs/llama_8b.yaml --fsdp 8]

`banking77` pretrains configs/tiny.yaml briefly (the base), then finetunes it on
../shared/data/classification/banking77 twice with the same steps, batch and data order: full finetuning
and LoRA (rank 8 on q, v; the head trains in full), and prints accuracy, macro-F1 on the test split,
trainable parameters, optimizer-state bytes, median step time and checkpoint size.

`memory` lays out the state of finetuning a config's model on a (data=1, fsdp=N, tensor=1) mesh of fake
CPU devices with jax.eval_shape (nothing is allocated) and prints per-device bytes of parameters,
optimizer state and gradients with and without LoRA. Activations are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BANKING = REPO.parent / "shared" / "data" / "classification" / "banking77"  # a clone beside ../shared


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def banking77(args: argparse.Namespace) -> None:
    import jax
    from flaxpod.train.cli import main as cli_main
    from flaxpod.train.config import load_config
    from flaxpod.train.finetuning import tree_bytes
    from flaxpod.train.optimizer import trainable_mask
    from flaxpod.train.trainer import Trainer

    work = Path(args.work)
    base = work / "base"
    if not (base / "checkpoints").is_dir():
        pretrain = [f"run_dir={base}", f"train.steps={args.pretrain_steps}", "train.eval_every=1000000"]
        assert cli_main(["pretrain", str(REPO / "configs" / "tiny.yaml"), *pretrain, "logging.tensorboard=false"]) == 0
    common = [
        f"finetune.base={base}",
        f"data.path={Path(args.data) / 'train.csv'}",
        f"data.val_path={Path(args.data) / 'test.csv'}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.log_every=10",
        f"checkpoint.every={args.steps}",
        "finetune.early_stop_metric=",
        "model.dropout=0.0",
        "logging.tensorboard=false",
    ]
    runs = {
        "full": [],
        "lora r8 q,v": ["finetune.lora.rank=8", "finetune.lora.alpha=16", f"optim.lr={args.lora_lr}"],
    }
    results = {}
    for name, extra in runs.items():
        run_dir = work / name.replace(" ", "_").replace(",", "")
        config = str(REPO / "configs" / "finetune_classify.yaml")
        assert cli_main(["finetune", config, f"run_dir={run_dir}", *common, *extra]) == 0
        cfg = load_config(run_dir / "config.yaml")
        trainer = Trainer.from_config(cfg)
        shapes = trainer.layout.shapes
        mask = trainable_mask(shapes.params, cfg.finetune.freeze, cfg.model.lora)
        trainable = sum(s.size for s, t in zip(jax.tree.leaves(shapes.params), jax.tree.leaves(mask), strict=True) if t)
        metrics = rows(run_dir)
        final = [r for r in metrics if "val_accuracy" in r][-1]
        times = [r["step_time"] for r in metrics if "step_time" in r][1:]  # the first includes compilation
        results[name] = {
            "accuracy": final["val_accuracy"],
            "macro_f1": final["val_macro_f1"],
            "trainable_params": trainable,
            "optimizer_state_bytes": tree_bytes(shapes.opt_state),
            "median_step_ms": 1000 * statistics.median(times),
            "checkpoint_bytes": dir_bytes(run_dir / "checkpoints" / str(args.steps)),
            "checkpoint_params_bytes": dir_bytes(run_dir / "checkpoints" / str(args.steps) / "params"),
        }
    print(f"\nbanking77, {args.steps} steps, load average {os.getloadavg()}")
    keys = list(next(iter(results.values())))
    print(f"{'':14}" + "".join(f"{k:>24}" for k in keys))
    for name, r in results.items():
        print(f"{name:14}" + "".join(f"{r[k]:>24,.4f}" if isinstance(r[k], float) else f"{r[k]:>24,}" for k in keys))
    (work / "results.json").write_text(json.dumps(results, indent=2))


def memory(args: argparse.Namespace) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fsdp}"
    import jax
    import numpy as np
    from flaxpod.model.config import LoraConfig
    from flaxpod.sharding.mesh import build_mesh
    from flaxpod.sharding.rules import make_rules
    from flaxpod.train.config import load_config
    from flaxpod.train.optimizer import make_optimizer, trainable_mask
    from flaxpod.train.state import make_layout

    cfg = load_config(args.config)
    mesh = build_mesh(1, args.fsdp, 1)
    rules = make_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)

    def per_device(shapes, shardings) -> int:
        return sum(
            int(np.prod(sh.shard_shape(s.shape))) * s.dtype.itemsize
            for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True)
        )

    print(f"{args.config}: per-device bytes on a (data=1, fsdp={args.fsdp}, tensor=1) mesh, {cfg.mesh.rules} rules")
    print(f"{'':22}{'params GiB':>12}{'opt state GiB':>15}{'grads GiB':>11}{'total GiB':>11}{'trainable':>16}")
    for name, lora in (("full finetuning", LoraConfig()), ("LoRA r8 q,v", LoraConfig(rank=8))):
        model = dataclasses.replace(cfg.model, lora=lora)
        tx, _ = make_optimizer(cfg.optim, 1000, lora=lora)
        layout = make_layout(model, tx, mesh, rules)
        mask = trainable_mask(layout.shapes.params, (), lora)
        shapes, shardings = layout.shapes, layout.shardings
        params = per_device(shapes.params, shardings.params)
        opt = per_device(shapes.opt_state, shardings.opt_state)
        # Gradients (float32, sharded like their parameters) exist for the trained parameters only.
        trained = [
            (s, sh)
            for s, sh, t in zip(*(jax.tree.leaves(x) for x in (shapes.params, shardings.params, mask)), strict=True)
            if t
        ]
        grads = per_device([s for s, _ in trained], [sh for _, sh in trained])
        n_trainable = sum(s.size for s, _ in trained)
        gib = 2**30
        print(
            f"{name:22}{params / gib:>12.2f}{opt / gib:>15.3f}{grads / gib:>11.3f}{(params + opt + grads) / gib:>11.2f}"
            f"{n_trainable:>16,}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("banking77")
    b.add_argument("--work", default="/tmp/bench_lora")
    b.add_argument("--data", default=str(BANKING), help="banking77 directory (train.csv, test.csv)")
    b.add_argument("--pretrain-steps", type=int, default=200)
    b.add_argument("--steps", type=int, default=150)
    b.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA's peak lr (full finetuning: the config's)")
    m = sub.add_parser("memory")
    m.add_argument("--config", default=str(REPO / "configs" / "llama_8b.yaml"))
    m.add_argument("--fsdp", type=int, default=8)
    args = parser.parse_args(argv)
    (banking77 if args.command == "banking77" else memory)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
