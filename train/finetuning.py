"""Finetuning a pretrained model on a task: the base run, the task's data, objective and validation.

The run itself is the pretraining loop (`train.loop.fit`) on the one Trainer: a task is an objective
(train/objectives.py), a batch layout (data/sft.py, data/classify.py) and a validation function.

Base: `finetune.base` names a pretraining run or an `import-hf` directory. Its model config and
tokenizer are the finetuning run's; of the model keys only those in ADJUSTABLE may be set, and a
shape key that differs from the base's is refused. `finetune.init=pretrained` starts from the base's
parameters (a new classification head is initialised fresh); `random` from fresh weights of the
same architecture (the transfer baseline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from flaxpod.data import classify as cls_data
from flaxpod.data import sft as sft_data
from flaxpod.data.sft_format import SFTFormat, load_sft_examples
from flaxpod.data.tokenizer import Tokenizer
from flaxpod.model.errors import ConfigError, InputError
from flaxpod.sharding.cpu_devices import prepare_cpu_backend
from flaxpod.train.checkpoint import make_run_info
from flaxpod.train.checkpoint_files import find_checkpoint
from flaxpod.train.classification_metrics import classification_report, summary_metrics
from flaxpod.train.config import Config, check_against_devices, to_dict
from flaxpod.train.data_source import RunData, load_run_data
from flaxpod.train.early_stopping import EarlyStopping
from flaxpod.train.loop import check_resume_compatible, check_run_dir, describe, fit, log
from flaxpod.train.lora_run import is_lora, partial_params, record_base
from flaxpod.train.objectives import CausalLM, Classify, class_logits
from flaxpod.train.optimizer import make_optimizer, trainable_mask
from flaxpod.train.run_dir import load_run_config, load_run_tokenizer, param_target, restore_params
from flaxpod.train.run_lock import hold_run_dir
from flaxpod.train.state import TrainState
from flaxpod.train.trainer import Trainer
from jax.experimental import multihost_utils

# Model keys a finetuning run may set; every other model key comes from the base.
ADJUSTABLE = (
    "dropout",
    "seq_len",
    "dtype",
    "attention",
    "attention_impl",
    "remat",
    "scan_layers",
    "mlp_chunks",
    "pooling",
)


@dataclass
class Base:
    run_dir: Path
    cfg: Config
    tokenizer: Tokenizer
    step: int


def load_base(cfg: Config) -> Base:
    """The base run, its tokenizer and the checkpoint step to start from (checked, nothing read)."""
    if not cfg.finetune.base:
        raise ConfigError("finetune.base: give the run directory to start from (a pretraining or import-hf run)")
    run_dir = Path(cfg.finetune.base)
    try:
        base_cfg = load_run_config(run_dir)
        tokenizer = load_run_tokenizer(run_dir, base_cfg)
        step, _ = find_checkpoint(run_dir, None if cfg.finetune.base_step < 0 else cfg.finetune.base_step)
    except InputError as e:
        raise InputError(f"finetune.base: {e}") from None
    return Base(run_dir, base_cfg, tokenizer, step)


def resolve_config(cfg: Config, base: Base, explicit: set[str]) -> Config:
    """cfg with the base's model and tokenizer; explicit model keys outside ADJUSTABLE must equal the base's."""
    changes = {}
    for key in sorted(k for k in explicit if k.startswith("model.")):
        name = key.split(".", 1)[1]
        value, base_value = getattr(cfg.model, name), getattr(base.cfg.model, name)
        if name in ADJUSTABLE:
            changes[name] = value
        elif value != base_value:
            raise ConfigError(
                f"{key}: {value!r} differs from the base's {base_value!r} ({base.run_dir}); finetuning keeps the "
                f"base's architecture (adjustable: {', '.join('model.' + k for k in ADJUSTABLE)})"
            )
    for key in sorted(k for k in explicit if k.startswith("tokenizer.")):
        name = key.split(".", 1)[1]
        if getattr(cfg.tokenizer, name) != getattr(base.cfg.tokenizer, name):
            raise ConfigError(f"{key}: finetuning uses the base's tokenizer ({base.run_dir / 'tokenizer'})")
    base_model = base.cfg.model
    model = dataclasses.replace(base_model, **{"max_seq_len": base_model.max_len, **changes})
    if model.seq_len > model.max_seq_len:
        raise ConfigError(f"model.seq_len: {model.seq_len} exceeds the base's model.max_seq_len={model.max_seq_len}")
    if base_model.lora.rank:
        raise ConfigError(f"finetune.base: {base.run_dir} is a LoRA run; export it merged and finetune the export")
    if cfg.finetune.lora.rank and "model.mlp_chunks" not in explicit:
        # Adapters take whole projections; the MLP in blocks computes the same function, so LoRA runs
        # drop the base's blocks unless the user asked for them (then the config refuses the pair).
        model = dataclasses.replace(model, mlp_chunks=1)
    model = dataclasses.replace(model, lora=cfg.finetune.lora)
    finetune = dataclasses.replace(cfg.finetune, base=str(base.run_dir), base_step=base.step)
    return dataclasses.replace(cfg, model=model, tokenizer=base.cfg.tokenizer, finetune=finetune)


def run_finetuning(cfg: Config, explicit: set[str]) -> dict[str, Any]:
    """Finetunes to cfg.train.steps (resuming from the run's latest checkpoint); returns final metrics."""
    run_dir = Path(cfg.run_dir)
    prepare_cpu_backend(cfg)
    check_against_devices(cfg, jax.device_count())
    check_run_dir(cfg)
    if cfg.data.path in ("", "stdlib"):
        raise ConfigError(f"data.path: give the task's training file (finetune.task={cfg.finetune.task})")
    base = load_base(cfg)
    cfg = resolve_config(cfg, base, explicit)
    task = TASKS[cfg.finetune.task](cfg, base.tokenizer, run_dir)
    cfg = task.cfg
    check_resume_compatible(cfg, run_dir, sections=("model", "tokenizer", "finetune"))
    trainer = Trainer.from_config(cfg, task.objective)
    early = (
        EarlyStopping(run_dir, cfg.finetune.early_stop_metric, cfg.finetune.patience)
        if (cfg.finetune.early_stop_metric)
        else None
    )

    # Inputs are valid: the run directory is written under its lock (`fit` writes config.yaml and the
    # tokenizer once the run restores; the task's own files are written here).
    partial = None
    if is_lora(cfg):
        shapes, shardings = trainer.layout.shapes.params, trainer.layout.param_shardings
        partial = partial_params(cfg, run_dir, shapes, shardings, trainer.mesh)
    log(f"base: {base.run_dir} step {base.step} ({cfg.finetune.init} weights); task {cfg.finetune.task}")
    log(f"data: {task.data.description}")
    describe(trainer, cfg)
    log_trainable(trainer, cfg)

    def init() -> TrainState:
        if cfg.finetune.init == "random":
            return trainer.init_state(cfg.seed)
        params, _ = restore_params(base.run_dir, base.step, param_target(base.cfg, trainer.mesh))
        params = {k: v for k, v in params.items() if k in trainer.layout.shapes.params and k != "cls_head"}
        return trainer.state_from_params(params, cfg.seed)

    with hold_run_dir(cfg.run_dir):
        if jax.process_index() == 0:
            task.write(run_dir)
        if partial is not None:
            record_base(run_dir, cfg)  # the base this run's adapters belong to (checked if it exists)
        return fit(
            cfg,
            trainer,
            task.data,
            make_run_info(to_dict(cfg), base.tokenizer),
            init=init,
            validate=task.validator(trainer),
            early_stopping=early,
            partial=partial,
        )


def log_trainable(trainer: Trainer, cfg: Config) -> None:
    """Trainable parameters and optimizer-state bytes, and what full finetuning's would be (from shapes)."""
    shapes = trainer.layout.shapes
    mask = trainable_mask(shapes.params, cfg.finetune.freeze, cfg.model.lora)
    trainable = sum(s.size for s, t in zip(jax.tree.leaves(shapes.params), jax.tree.leaves(mask), strict=True) if t)
    full_tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    full_state = jax.eval_shape(full_tx.init, shapes.params)
    what = (
        f"LoRA rank {cfg.model.lora.rank} on {','.join(cfg.model.lora.targets)}" if cfg.model.lora.rank else "this run"
    )
    log(
        f"trainable parameters: {trainable:,} of {sum(s.size for s in jax.tree.leaves(shapes.params)):,}; optimizer "
        f"state {tree_bytes(shapes.opt_state) / 2**20:,.2f} MiB ({what}) vs {tree_bytes(full_state) / 2**20:,.2f} MiB "
        f"for full finetuning"
    )


def tree_bytes(tree: Any) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype"))


# ---------------------------------------------------------------------------------------------
# Tasks


def _holdout(examples: list, cfg: Config) -> tuple[list, list]:
    """(train, validation) when no data.val_path is given: a seeded `data.val_fraction` of the examples."""
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    n_val = max(1, int(round(cfg.data.val_fraction * len(examples))))
    if n_val >= len(examples):
        raise InputError(f"data.path: {len(examples)} examples are too few to hold out a validation split")
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def _rows(cfg: Config) -> dict[str, int]:
    return {
        "global_batch_size": cfg.data.batch_size,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }


@dataclass
class Task:
    cfg: Config  # the run's config, completed by the task (e.g. model.num_labels)
    data: RunData
    objective: Any
    validator: Callable[[Trainer], Callable[[dict], dict[str, float]] | None]  # None: the objective's val_loss
    write: Callable[[Path], None]  # task files written into the run directory


def sft_format(cfg: Config) -> SFTFormat:
    d = cfg.data
    return SFTFormat(
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        messages_field=d.messages_field,
        prompt_template=d.prompt_template,
        system_template=d.system_template,
        user_template=d.user_template,
        assistant_template=d.assistant_template,
    )


def sft_task(cfg: Config, tokenizer: Tokenizer, run_dir: Path) -> Task:
    """Instruction tuning: packed examples, loss on response tokens only (CausalLM with a loss mask)."""
    fmt = sft_format(cfg)
    examples = load_sft_examples(cfg.data.path, fmt)
    if cfg.data.val_path:
        train, val = examples, load_sft_examples(cfg.data.val_path, fmt)
    else:
        train, val = _holdout(examples, cfg)
    seq_len = cfg.model.seq_len
    train_tok, train_stats = sft_data.tokenize_examples(train, tokenizer, seq_len)
    val_tok, _ = sft_data.tokenize_examples(val, tokenizer, seq_len)
    train_iter = sft_data.make_sft_train_iterator(train_tok, seq_len=seq_len, seed=cfg.seed, **_rows(cfg))
    eval_batches = sft_data.make_sft_eval_batches(val_tok, seq_len=seq_len, **_rows(cfg))
    s = train_stats
    description = (
        f"sft {cfg.data.path}: {s.kept:,} training examples ({s.truncated} truncated from the left, {s.dropped} "
        f"dropped as too long for seq_len {seq_len}), {s.loss_tokens:,} response tokens of {s.tokens:,}; "
        f"{len(val_tok):,} validation examples; packing efficiency {train_iter.epoch_packing_efficiency(0):.1%}"
    )

    def validator(trainer: Trainer) -> Callable[[dict], dict[str, float]]:
        def validate(params: dict) -> dict[str, float]:
            loss = trainer.evaluate(params, eval_batches)["loss"]
            return {"val_loss": loss, "val_perplexity": float(np.exp(loss))}

        return validate

    data = RunData(tokenizer, train_iter, eval_batches, description)
    return Task(cfg, data, CausalLM.from_optim(cfg.optim), validator, lambda _: None)


def classify_task(cfg: Config, tokenizer: Tokenizer, run_dir: Path) -> Task:
    """Sequence classification: one example per row, a linear head on the pooled last hidden state."""
    d = cfg.data
    examples = cls_data.read_examples(d.path, d.text_field, d.label_field)
    labels = cls_data.collect_labels(examples, d.path)
    saved = run_dir / cls_data.LABELS_FILE
    if saved.is_file() and cls_data.load_labels(saved) != labels:
        raise InputError(f"{d.path}: its labels differ from {saved} of the existing run; choose another run_dir")
    if d.val_path:
        train, val, val_path = examples, cls_data.read_examples(d.val_path, d.text_field, d.label_field), d.val_path
    else:
        (train, val), val_path = _holdout(examples, cfg), d.path
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_labels=len(labels)))
    # Causal models pool the last token: an EOS there reads the whole text, as in GPT-style classifiers.
    append_eos = tokenizer.eos_id is not None and cfg.model.pooling == "last"
    seq_len = cfg.model.seq_len
    train_enc = cls_data.encode_examples(train, tokenizer, labels, seq_len, d.path, append_eos=append_eos)
    val_enc = cls_data.encode_examples(val, tokenizer, labels, seq_len, val_path, append_eos=append_eos)
    rows = _rows(cfg)
    train_iter = cls_data.make_classify_train_iterator(train_enc, seed=cfg.seed, **rows)
    eval_batches = cls_data.make_classify_eval_batches(val_enc, **rows)
    weights = cls_data.class_weights(train_enc.label_ids, len(labels)) if cfg.finetune.class_weights else None
    s = train_enc.stats()
    description = (
        f"classify {d.path}: {s['examples']:,} training examples, {len(labels)} labels, {s['truncated']} truncated "
        f"to seq_len {seq_len} (longest {s['max_tokens']} tokens); {len(val_enc):,} validation examples"
        + (" (held out of data.path)" if not d.val_path else "")
    )

    def validator(trainer: Trainer) -> Callable[[dict], dict[str, float]]:
        predict = prediction_fn(trainer)

        def validate(params: dict) -> dict[str, float]:
            y_true, y_pred, _ = predict_batches(predict, trainer, params, eval_batches)
            out = {"val_loss": trainer.evaluate(params, eval_batches)["loss"]}
            out.update(
                {f"val_{k}": v for k, v in summary_metrics(classification_report(y_true, y_pred, labels)).items()}
            )
            return out

        return validate

    data = RunData(tokenizer, train_iter, eval_batches, description)
    return Task(
        cfg, data, Classify(weights), validator, lambda run: cls_data.save_labels(run / cls_data.LABELS_FILE, labels)
    )


def lm_task(cfg: Config, tokenizer: Tokenizer, run_dir: Path) -> Task:
    """Continued pretraining: the pretraining data pipeline (text or prepared datasets, data.* as in
    pretraining) and its next-token loss on every token, from the base's weights and tokenizer."""
    cfg = dataclasses.replace(
        cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(Path(cfg.finetune.base) / "tokenizer"))
    )
    data = load_run_data(cfg, run_dir)
    if data.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise InputError(f"{run_dir}/tokenizer: differs from the base's {cfg.tokenizer.path}; choose another run_dir")
    return Task(cfg, data, CausalLM.from_optim(cfg.optim), lambda _: None, lambda _: None)


TASKS = {"sft": sft_task, "classify": classify_task, "lm": lm_task}


# ---------------------------------------------------------------------------------------------
# Predictions (validation, evaluate --classify, predict)


def prediction_fn(trainer_or_graph: Any) -> Callable:
    """(params, batch) -> (class probabilities [B, C], labels [B], index [B]), jitted for the mesh."""
    graphdef = trainer_or_graph.layout.graphdef

    def predict(params, batch):
        logits = class_logits(nnx.merge(graphdef, params), batch, None)
        return jax.nn.softmax(logits, axis=-1), batch["labels"], batch["index"]

    return trainer_or_graph.compile_eval(predict)


def predict_batches(
    predict: Callable, trainer: Any, params: dict, batches
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true label ids, predicted ids, probabilities) of every real row of `batches`, in example order."""
    probs, labels, index = [], [], []
    for batch in batches:
        p, y, i = predict(params, trainer.put(batch))
        if jax.process_count() > 1:
            p, y, i = multihost_utils.process_allgather((p, y, i), tiled=True)
        probs.append(np.asarray(p))
        labels.append(np.asarray(y))
        index.append(np.asarray(i))
    probs, labels, index = np.concatenate(probs), np.concatenate(labels), np.concatenate(index)
    real = index >= 0
    order = np.argsort(index[real], kind="stable")
    probs, labels = probs[real][order], labels[real][order]
    return labels, probs.argmax(axis=-1), probs
