"""The training loop: feeds a Trainer (train/trainer.py) batches, checkpoints, evaluates and logs.

`run_pretraining` is the pretrain entry point's job; `fit` is the loop itself, shared by every
objective (finetuning passes its own initial state and validation).

Everything that can be wrong with the input (config, devices, corpus, tokenizer, the run directory
itself) is checked before the run directory is touched, and `fit` writes the run's files only once
the checkpoint to resume from has restored (a changed optimizer, a params-only import), under the
run directory's lock (train/run_lock.py), so a bad command never writes over an existing run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import yaml
from flaxpod.data.tokenizer import Tokenizer, has_tokenizer
from flaxpod.model.layers import xla_matmul
from flaxpod.sharding.cpu_devices import on_cpu, prepare_cpu_backend
from flaxpod.sharding.mesh import sharding_table
from flaxpod.train.checkpoint import Checkpointer, PartialParams, make_run_info
from flaxpod.train.config import Config, ConfigError, check_against_devices, config_from_dict, save_config, to_dict
from flaxpod.train.data_source import RunData, load_run_data
from flaxpod.train.dispatch import StepWindow
from flaxpod.train.early_stopping import EarlyStopping
from flaxpod.train.faults import Decision, NonFiniteWatch, RunControl, StopRequested
from flaxpod.train.flops import flops_per_token, peak_flops_per_device
from flaxpod.train.metrics import MetricsWriter, StepProgress, format_duration
from flaxpod.train.mlm import pretraining_objective, with_objective_model
from flaxpod.train.run_lock import RunDirNotWritable, hold_run_dir
from flaxpod.train.state import TrainState
from flaxpod.train.trainer import Trainer

VOCAB_MULTIPLE = 64  # embedding rows rounded up so vocab splits evenly over tensor axes


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def resolve_model_config(cfg: Config, tokenizer: Tokenizer) -> Config:
    """Fills derived model fields (vocab size, maximum length) and checks them."""
    m = cfg.model
    vocab = m.vocab_size or -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    model = dataclasses.replace(m, vocab_size=vocab, max_seq_len=m.max_len)
    return dataclasses.replace(cfg, model=model)


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.yaml as a nested dict (None if there is none); a damaged one is a ConfigError."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", e)
        raise ConfigError(f"{path}{where}: invalid YAML ({problem}); fix it or choose another run_dir") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}); fix it or choose another run_dir") from None
    sections = [k for k, v in to_dict(Config()).items() if isinstance(v, dict)]
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k, {}), dict) for k in sections):
        raise ConfigError(f"{path}: not a run config (expected a mapping of sections); fix it or use another run_dir")
    return saved


def check_run_dir(cfg: Config) -> None:
    """run_dir must be a directory (or not exist yet) and must not lie inside data.path: a run there
    would read its own checkpoints, metrics and event files back as training text on resume."""
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
    inside = run_dir.resolve()
    for spec in (p.strip() for p in cfg.data.path.split(",")):
        if spec and Path(spec).is_dir() and inside.is_relative_to(Path(spec).resolve()):
            raise ConfigError(f"run_dir: {run_dir} lies inside data.path {spec}; choose a run_dir outside the data")


def check_resume_compatible(cfg: Config, run_dir: Path, sections: tuple[str, ...] = ("model", "tokenizer")) -> None:
    """A run directory is resumed only by the same model: anything else would be overwritten."""
    saved = saved_config(run_dir)
    if saved is None:
        return
    saved_path = run_dir / "config.yaml"
    saved = to_dict(config_from_dict(saved))  # through Config: keys added since the run was written take defaults
    current = to_dict(cfg)
    for section in sections:
        for key, value in current[section].items():
            old = saved.get(section, {}).get(key)
            if old != value:
                raise ConfigError(
                    f"{section}.{key}: {value!r} differs from {old!r} in the existing run "
                    f"{saved_path}; resume with the same model or choose another run_dir"
                )


def write_run_files(cfg: Config, run_dir: Path, tokenizer: Tokenizer) -> None:
    """config.yaml and tokenizer/ (process 0). `fit` calls it once the run is known to resume (or
    start) cleanly. config.yaml is replaced atomically, and only when a key differs (the keys
    that may change on resume: steps, checkpoint policy, logging, mesh, optimizer), so an
    interrupted write never leaves a half file and an unchanged run is not touched."""
    if jax.process_index() != 0:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not has_tokenizer(run_dir / "tokenizer"):
            tokenizer.save(run_dir / "tokenizer")
        path = run_dir / "config.yaml"
        if not path.exists() or saved_config(run_dir) != to_dict(cfg):
            tmp = path.with_name(f".{path.name}.tmp")
            save_config(cfg, tmp)
            tmp.replace(path)
    except OSError as e:
        raise RunDirNotWritable(f"run_dir {run_dir}: cannot write the run's files ({e.strerror or e})") from None


def describe(trainer: Trainer, cfg: Config) -> None:
    n_params, n_nonembed = trainer.param_counts()
    shape = trainer.mesh.shape
    log(
        f"model: {cfg.model.family}, {n_params / 1e6:.2f}M parameters ({n_nonembed / 1e6:.2f}M "
        f"non-embedding); mesh data={shape['data']} fsdp={shape['fsdp']} tensor={shape['tensor']} "
        f"over {jax.device_count()} devices in {jax.process_count()} process(es)"
    )
    if on_cpu(trainer.mesh):
        kernel = "XLA's" if trainer.matmul is xla_matmul else "OpenBLAS sgemm, one thread per device"
        log(f"CPU matrix products and attention: {kernel} (mesh.cpu_matmul={cfg.mesh.cpu_matmul})")
    if cfg.logging.show_sharding:
        log(sharding_table(trainer.layout.shapes.params, trainer.layout.param_shardings))


def run_pretraining(cfg: Config) -> dict[str, Any]:
    """Trains to cfg.train.steps (resuming from the latest checkpoint); returns final metrics."""
    run_dir = Path(cfg.run_dir)
    prepare_cpu_backend(cfg)
    check_against_devices(cfg, jax.device_count())
    check_run_dir(cfg)
    data = load_run_data(cfg, run_dir)
    cfg = with_objective_model(resolve_model_config(cfg, data.tokenizer))
    check_resume_compatible(cfg, run_dir)
    if cfg.model.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"model.seq_len: {cfg.model.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    trainer = Trainer.from_config(cfg, pretraining_objective(cfg, data.tokenizer))

    # Inputs are valid: `fit` takes the run directory's lock and writes it once the run restores.
    log(f"data: {data.description}")
    describe(trainer, cfg)
    return fit(cfg, trainer, data, make_run_info(to_dict(cfg), data.tokenizer))


def fit(
    cfg: Config,
    trainer: Trainer,
    data: RunData,
    run_info: dict[str, Any],
    *,
    init: Callable[[], TrainState] | None = None,
    validate: Callable[[dict], dict[str, float]] | None = None,
    early_stopping: EarlyStopping | None = None,
    partial: PartialParams | None = None,
) -> dict[str, Any]:
    """Trains `trainer` on `data` to cfg.train.steps, resuming from the run's latest checkpoint.

    Holds the run directory's lock throughout (one writer per run_dir), and writes config.yaml and
    the tokenizer (`write_run_files`) only once the checkpoint to resume from has restored, so a
    refused resume (another optimizer, a params-only import) leaves the run as it was.

    init: the state of a new run (default: fresh parameters from cfg.seed). validate: params ->
    validation metrics (default: the objective's metrics on data.eval_batches, named val_*).
    early_stopping: checkpoints each new best step, keeps it whatever the retention policy, and ends
    the run once its patience is spent. partial: checkpoint only part of the parameters (LoRA).
    Returns the last logged metrics.
    """
    with hold_run_dir(cfg.run_dir):
        return _fit(
            cfg, trainer, data, run_info, init=init, validate=validate, early_stopping=early_stopping, partial=partial
        )


def _fit(
    cfg: Config,
    trainer: Trainer,
    data: RunData,
    run_info: dict[str, Any],
    *,
    init: Callable[[], TrainState] | None,
    validate: Callable[[dict], dict[str, float]] | None,
    early_stopping: EarlyStopping | None,
    partial: PartialParams | None = None,
) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    train_iter = data.train_iter
    checkpointer = Checkpointer(
        run_dir,
        keep=cfg.checkpoint.keep,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
        run_info=run_info,
        partial=partial,
    )
    checkpointer.remove_partial_saves()
    if early_stopping is not None and early_stopping.best_step is not None:
        checkpointer.protected.add(early_stopping.best_step)
    restored = checkpointer.restore_latest(trainer.layout)
    if restored is None:
        state = init() if init is not None else trainer.init_state(cfg.seed)
        start = 0
    else:
        state, start = restored.state, restored.step
        if restored.data_state is not None:
            train_iter.set_state(restored.data_state)
        log(f"resumed from {checkpointer.directory / str(start)}")
    write_run_files(cfg, run_dir, data.tokenizer)
    if validate is None:

        def validate(params: dict) -> dict[str, float]:
            return {f"val_{k}": v for k, v in trainer.evaluate(params, data.eval_batches).items()}

    writer = MetricsWriter(run_dir, enabled=is_main, tensorboard=cfg.logging.tensorboard, resume_step=start)
    progress = StepProgress(cfg.train.steps, enabled=is_main)
    peak, peak_source = peak_flops_per_device(trainer.mesh, cfg.logging.peak_flops)
    n_nonembed = trainer.param_counts()[1]
    flops_tok = flops_per_token(cfg.model.n_layer, cfg.model.d_model, cfg.model.seq_len, n_nonembed)
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    log(f"MFU against {peak / 1e9:.1f} GFLOP/s per device ({peak_source}); {flops_tok / 1e6:.2f} MFLOP per token")
    log(f"training steps {start}..{cfg.train.steps} in {run_dir}")

    control = RunControl(
        run_dir,
        every=cfg.checkpoint.every,
        every_minutes=cfg.checkpoint.every_minutes,
        last_step=cfg.train.steps,
        sync_every=cfg.checkpoint.sync_every,
    )
    nonfinite = NonFiniteWatch(cfg.train.nonfinite, skipped_at_start=int(state.skipped_steps))
    pending: list[tuple[int, dict]] = []  # metrics of the steps not yet fetched from the device
    window = StepWindow()  # the host stays a few steps ahead of the devices (train/dispatch.py)

    def fetch_pending() -> list[tuple[int, dict]]:
        """Fetches (waits for) the pending steps' metrics and applies train.nonfinite to them."""
        rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
        pending.clear()
        warning = nonfinite.check(rows, last_checkpoint=checkpointer.committed_step)
        if warning:
            log(f"warning: {warning}")
        return rows

    final: dict[str, Any] = {}
    best_reason, finish_early = "", False
    interval_start, interval_steps = time.perf_counter(), 0
    step = start
    try:
        with control:
            while step < cfg.train.steps:
                state, metrics = trainer.step(state, trainer.put(next(train_iter)))
                step += 1
                pending.append((step, metrics))
                window.dispatched(metrics)
                interval_steps += 1
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    row = fetch_pending()[-1][1]
                    step_seconds = (time.perf_counter() - interval_start) / interval_steps
                    row["tokens_per_sec"] = tokens_per_step / step_seconds
                    row["mfu"] = row["tokens_per_sec"] * flops_tok / (peak * jax.device_count())
                    row["step_time"] = step_seconds
                    writer.write(step, row)
                    progress.show(step, row, step_seconds)
                    final.update(row)
                    interval_start, interval_steps = time.perf_counter(), 0
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps:
                    jax.block_until_ready(state.params)  # the dispatched steps finish inside the training time
                    eval_start = time.perf_counter()
                    val = validate(state.params)
                    writer.write(step, val)
                    log(f"step {step:>6}/{cfg.train.steps} | " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                    final.update(val)
                    # Evaluation time is not training time. Shifting the window's start keeps the steps run since
                    # the last log in it (resetting the start alone divided fewer seconds by all of them: the
                    # row after a mid-window evaluation reported about twice the real speed).
                    interval_start += time.perf_counter() - eval_start
                    if early_stopping is not None:
                        improved, finish_early = early_stopping.update(step, val)
                        if improved:  # every process has the same metrics: no agreement needed
                            checkpointer.protected = {step}
                            best_reason = f"best {early_stopping.metric} so far"
                        if finish_early:
                            log(
                                f"early stop at step {step}: {early_stopping.metric} did not improve for "
                                f"{early_stopping.patience} evaluations; best step {early_stopping.best_step}"
                            )
                decision = control.decide(step)
                if best_reason or finish_early:
                    reason = "; ".join(r for r in (decision.reason, best_reason) if r)
                    decision = Decision(save=True, stop=decision.stop, reason=reason)
                    best_reason = ""
                if decision.save:
                    fetch_pending()  # under train.nonfinite=stop, never checkpoint past a non-finite step
                    final_or_stop = decision.stop or finish_early or step == cfg.train.steps
                    on_commit = control.saved()  # SAVE_NOW goes only once this checkpoint is committed
                    blocked = checkpointer.save(
                        step, state, train_iter.get_state(), wait=final_or_stop, on_commit=on_commit
                    )
                    writer.write(step, {"checkpoint_blocked_s": blocked})
                    if decision.reason:
                        log(f"step {step:>6}/{cfg.train.steps} | checkpoint ({decision.reason})")
                    interval_start += blocked  # reported on its own, not as step time
                if finish_early:
                    break
                if decision.stop and step < cfg.train.steps:
                    raise StopRequested(
                        f"stopped at step {step} ({decision.reason}); checkpoint {checkpointer.directory / str(step)} "
                        f"written: run the same command again to resume"
                    )
    finally:
        checkpointer.close()
        writer.close()
        if hasattr(train_iter, "close"):  # prefetching iterators hold threads or processes
            train_iter.close()
    elapsed = time.perf_counter() - progress.start
    log(
        f"done: {step} steps in {format_duration(elapsed)}; outputs in {run_dir.resolve()} "
        f"(config.yaml, tokenizer/, checkpoints/, metrics.jsonl, tensorboard/)"
    )
    final["step"] = step
    return final
