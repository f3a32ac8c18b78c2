"""Typed run configuration: nested dataclasses, loaded from YAML, overridden as `key.sub=value`.

Every field carries a docstring-style comment; `flaxpod config-reference` prints them, so the README's
reference is generated from this file and cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from flaxpod.model.config import LoraConfig, ModelConfig
from flaxpod.model.errors import ConfigError

__all__ = ["ConfigError", "ModelConfig"]  # re-exported: config code raises it; Config holds a ModelConfig


@dataclass
class TokenizerConfig:
    kind: str = "sentencepiece"
    """`char` (nanoGPT's character tokenizer), `sentencepiece`, or `huggingface` (any tokenizer.json via the
    `tokenizers` library; trained in-process as a byte-level BPE if the run has none and no `path`)."""
    vocab_size: int = 4096
    """Vocabulary size when training a SentencePiece or byte-level BPE tokenizer."""
    model_type: str = "bpe"
    """SentencePiece model type: `bpe` or `unigram`."""
    path: str = ""
    """Existing tokenizer to use instead of training: a flaxpod tokenizer directory, a Hugging Face model
    directory or tokenizer.json, or a SentencePiece .model file."""


@dataclass
class DataConfig:
    path: str = "stdlib"
    """Text file, directory or glob (comma-separated for several), or `stdlib`: the built-in corpus
    (Python's own standard library sources, on every machine with Python)."""
    batch_size: int = 32
    """Global batch size in sequences per optimizer step (all processes and micro-batches together)."""
    val_fraction: float = 0.1
    """Fraction of the tokens, taken from the end, held out for validation (text files)."""
    window_stride: int = 0
    """Offset between training windows; 0 means seq_len (no overlap), 1 samples every offset like nanoGPT."""
    max_bytes: int = 0
    """Read at most this many bytes of text (0: all); keeps quick runs quick."""
    weights: list[float] = field(default_factory=list)
    """Mixture weights when `path` lists several prepared datasets (comma-separated); empty means equal."""
    val_path: str = ""
    """Finetuning: the validation file (same format as `path`); empty holds out `val_fraction` of `path`'s examples."""
    text_field: str = "text"
    """Finetuning, classify: the column (CSV/TSV) or field (JSONL) holding the text."""
    label_field: str = "label"
    """Finetuning, classify: the column or field holding the label."""
    prompt_field: str = "prompt"
    """Finetuning, sft: the JSONL field holding the prompt (e.g. `instruction`, `question`)."""
    response_field: str = "response"
    """Finetuning, sft: the field holding the response; a list of {input, output} instances is expanded."""
    messages_field: str = "messages"
    """Finetuning, sft: the field holding a chat, a list of {role, content} (roles system, user, assistant)."""
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    """Finetuning, sft: how a prompt is rendered before its response ({prompt} is replaced)."""
    system_template: str = "<|system|>\n{content}\n"
    """Finetuning, sft: rendering of a chat's system message."""
    user_template: str = "<|user|>\n{content}\n"
    """Finetuning, sft: rendering of a chat's user message."""
    assistant_template: str = "<|assistant|>\n{content}\n"
    """Finetuning, sft: rendering of an assistant message; only {content} and the EOS after it carry loss."""


@dataclass
class MeshConfig:
    data: int = -1
    """Data-parallel axis size (replicated parameters). -1 absorbs the remaining devices."""
    fsdp: int = 1
    """Fully-sharded data-parallel axis size (parameters and optimizer state sharded, batch split)."""
    tensor: int = 1
    """Tensor-parallel axis size (heads and MLP columns split)."""
    dcn_data: int = 1
    """Several TPU slices or GPU nodes: how many of the `data` axis's ways go across slices/nodes (the slow
    data-center network); must divide the data size. The rest of the mesh stays inside a slice (ICI/NVLink)."""
    dcn_fsdp: int = 1
    """Like dcn_data for the `fsdp` axis; slices/nodes = dcn_data * dcn_fsdp (1 * 1: a single slice or node)."""
    rules: str = "fsdp_tp"
    """Logical-axis rule preset: `dp`, `fsdp`, or `fsdp_tp` (see sharding/rules.py)."""
    rule_overrides: dict[str, Any] = field(default_factory=dict)
    """Per-logical-axis overrides of the preset, e.g. {vocab: null, mlp: [fsdp, tensor]}."""
    cpu_devices: int = 0
    """CPU only (training jobs): XLA devices of the process, each running single-threaded on its own core
    with the batch split across them. 0: one per usable core (at most 8) that the mesh and the micro-batch
    allow; 1: JAX's single CPU device with a thread pool. Ignored when XLA_FLAGS sets
    --xla_force_host_platform_device_count or under jax.distributed (sharding/cpu_devices.py)."""
    cpu_matmul: str = "auto"
    """CPU only: `auto` runs the dense layers' float32 matrix products and the attention (without dropout)
    through OpenBLAS (small kernels built on first use with the machine's C++ compiler) when every CPU device
    has a core and the parameters are replicated, else XLA's; `xla`: always XLA's (sharding/cpu_matmul.py,
    model/cpu_gemm.py, model/cpu_attention.py)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the decay."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to lr."""
    schedule: str = "cosine"
    """Decay after warm-up: `cosine`, `linear`, or `constant`."""
    decay_steps: int = 0
    """Steps over which lr decays to min_lr, counted from step 0 like nanoGPT's lr_decay_iters; 0 means train.steps."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings only (not norms or biases)."""
    grad_clip: float = 1.0
    """Global-norm gradient clipping; 0 disables."""
    z_loss: float = 0.0
    """Weight of the z-loss (log(Z)^2) that keeps logits from drifting; 0 disables."""
    loss_chunk: int = 0
    """Causal LM loss computed this many sequence positions at a time, recomputing each chunk's logits in the
    backward pass, so the [batch, seq, vocab] float32 logits never exist at once (large vocabularies); 0 = off.
    The loss and gradient equal the plain ones to float rounding; a seq_len it does not divide is padded."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to train."""
    log_every: int = 10
    """Steps between metric rows / progress lines (metrics are fetched from the device only then; the host
    still waits for the step dispatched 4 steps before, train/dispatch.py)."""
    eval_every: int = 100
    """Steps between validation evaluations; 0 disables (an evaluation also runs at the end)."""
    eval_steps: int = 10
    """Validation batches per evaluation."""
    grad_accum: int = 1
    """Micro-batches per step; the global batch is split into this many and gradients are averaged."""
    nonfinite: str = "skip"
    """A step whose loss or gradients are not finite never changes the parameters. `skip`: go on (counted in
    the skipped_steps metric); `stop`: stop at the next log step with exit code 3, keeping the last checkpoint."""
    objective: str = "causal"
    """Pretraining objective: `causal` (next-token prediction) or `mlm` (masked-LM encoder: bidirectional attention
    within a document, loss on the `mlm.mask_prob` selected tokens; see the `mlm` section)."""


@dataclass
class MlmConfig:
    mask_prob: float = 0.15
    """train.objective=mlm: fraction of the non-padding, non-special tokens selected for prediction (BERT: 0.15)."""
    mask_fraction: float = 0.8
    """Of the selected tokens, the fraction replaced by the mask token."""
    random_fraction: float = 0.1
    """Of the selected tokens, the fraction replaced by a random token (the rest stay as they are)."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Steps between checkpoints (one is always written at the end); 0 writes only the final one."""
    every_minutes: float = 0.0
    """Also write a checkpoint once this many minutes have passed since the last one; 0 disables."""
    keep: int = 3
    """Most recent complete checkpoints to keep."""
    keep_every: int = 0
    """Also keep, permanently, every checkpoint whose step is a multiple of this; 0 keeps only the `keep` newest."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on (stop and final checkpoints are waited for)."""
    sync_every: int = 10
    """Several processes: steps between their agreement on stop and save-now requests (a tiny all-gather);
    one process checks every step at no cost."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tensorboard."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 means: measured (CPU: a matmul on every device at once) or chip's bf16."""
    show_sharding: bool = False
    """Print each parameter's shape, partition spec and bytes per device at start-up."""


@dataclass
class FinetuneConfig:
    task: str = "sft"
    """`sft` (instruction/chat tuning, loss on responses only), `classify` (sequence classification head), or
    `lm` (continued pretraining on data.path's text or prepared datasets, loss on every token)."""
    base: str = ""
    """Run directory of the model to start from: a flaxpod pretraining run or an `import-hf` directory."""
    base_step: int = -1
    """Checkpoint step of the base; -1 means its newest usable one (the resolved step is saved in config.yaml)."""
    init: str = "pretrained"
    """`pretrained` (the base's weights) or `random` (the base's architecture and tokenizer, fresh weights)."""
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Learning-rate multiplier per parameter group (`embed`, `blocks`, `head`, `task_head`), e.g. {embed: 0.1}."""
    freeze: list[str] = field(default_factory=list)
    """Parameter groups that do not train (no optimizer state), e.g. [embed] or embed,blocks."""
    class_weights: bool = False
    """Classify: weight the loss by inverse class frequency of the training labels (sklearn's `balanced`)."""
    early_stop_metric: str = ""
    """Validation metric to keep the best step by and stop on (e.g. `val_macro_f1`, `val_loss`); empty: none."""
    patience: int = 0
    """Evaluations without improvement of early_stop_metric before training stops; 0 never stops early."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Output directory: config.yaml, tokenizer, checkpoints/, tensorboard/, metrics.jsonl. Re-running resumes."""
    seed: int = 0
    """Seed for parameters, data order and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        validate(self)


CHOICES = {
    "tokenizer.kind": ("char", "sentencepiece", "huggingface"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "mesh.rules": ("dp", "fsdp", "fsdp_tp"),
    "mesh.cpu_matmul": ("auto", "xla"),
    "train.nonfinite": ("skip", "stop"),
    "train.objective": ("causal", "mlm"),
    "finetune.task": ("sft", "classify", "lm"),
    "finetune.init": ("pretrained", "random"),
}

POSITIVE = (
    "data.batch_size",
    "train.steps",
    "train.log_every",
    "train.grad_accum",
    "train.eval_steps",
    "checkpoint.keep",
    "checkpoint.sync_every",
    "tokenizer.vocab_size",
)


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Single-config checks (devices and tokenizer are checked later, when they are known); the model's own
    checks ran in ModelConfig.__post_init__."""
    if not str(cfg.run_dir).strip():
        raise ConfigError("run_dir: must not be empty (it would write the run into the current directory)")
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {_get(cfg, key)!r}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)!r}")
    for key in ("checkpoint.every", "checkpoint.every_minutes", "checkpoint.keep_every", "optim.loss_chunk"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)!r}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a fraction in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by train.grad_accum={cfg.train.grad_accum}"
        )
    if not (0.0 < cfg.mlm.mask_prob < 1.0 and cfg.mlm.mask_fraction >= 0 and cfg.mlm.random_fraction >= 0):
        raise ConfigError(f"mlm: expected 0 < mask_prob < 1 and non-negative fractions, got {cfg.mlm}")
    if cfg.mlm.mask_fraction + cfg.mlm.random_fraction > 1.0:
        raise ConfigError(
            f"mlm.random_fraction: mask_fraction + random_fraction must be <= 1, got "
            f"{cfg.mlm.mask_fraction} + {cfg.mlm.random_fraction}"
        )
    if cfg.model.bidirectional and cfg.train.objective == "causal" and cfg.finetune.task != "classify":
        raise ConfigError(
            "model.bidirectional: a causal LM must not see the tokens it predicts; use train.objective=mlm"
        )
    m, mesh = cfg.model, cfg.mesh
    sizes = {"mesh.data": mesh.data, "mesh.fsdp": mesh.fsdp, "mesh.tensor": mesh.tensor}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
    for key, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"{key}: expected a positive size or -1, got {v}")
    if mesh.cpu_devices < 0:
        raise ConfigError(f"mesh.cpu_devices: expected 0 (one per core) or a positive count, got {mesh.cpu_devices}")
    for key, size, dcn in (("mesh.dcn_data", mesh.data, mesh.dcn_data), ("mesh.dcn_fsdp", mesh.fsdp, mesh.dcn_fsdp)):
        if dcn < 1:
            raise ConfigError(f"{key}: expected a positive number of slices/nodes, got {dcn}")
        if size > 0 and size % dcn:
            raise ConfigError(f"{key}: {dcn} does not divide {key.replace('dcn_', '')}={size}")
    if mesh.tensor > 0 and m.n_head % mesh.tensor:
        raise ConfigError(f"model.n_head: {m.n_head} is not divisible by mesh.tensor={mesh.tensor}")
    if mesh.tensor > 0 and m.kv_heads % mesh.tensor:
        raise ConfigError(f"model.n_kv_head: {m.kv_heads} is not divisible by mesh.tensor={mesh.tensor}")


def resolve_mesh_shape(mesh: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 filled in; the product must equal the device count."""
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(
                f"mesh: {device_count} devices cannot be split as data={mesh.data} "
                f"fsdp={mesh.fsdp} tensor={mesh.tensor}"
            )
        sizes[sizes.index(-1)] = device_count // known
    if sizes[0] * sizes[1] * sizes[2] != device_count:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = "
            f"{sizes[0] * sizes[1] * sizes[2]} does not match the {device_count} devices"
        )
    for key, size, dcn in (("mesh.dcn_data", sizes[0], mesh.dcn_data), ("mesh.dcn_fsdp", sizes[1], mesh.dcn_fsdp)):
        if size % dcn:
            axis = key.replace("dcn_", "")
            raise ConfigError(f"{key}: {dcn} does not divide {axis}={size} on {device_count} devices")
    return sizes[0], sizes[1], sizes[2]


def micro_batch_size(cfg: Config) -> int:
    """Rows of one micro-batch: the step's batch over train.grad_accum."""
    return cfg.data.batch_size // cfg.train.grad_accum


def check_against_devices(cfg: Config, device_count: int) -> tuple[int, int, int]:
    """Checks that need the device count: the mesh and the batch split."""
    data, fsdp, tensor = resolve_mesh_shape(cfg.mesh, device_count)
    batch_ways = data * fsdp
    micro = micro_batch_size(cfg)
    if micro % batch_ways:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} (micro-batch {micro} with train.grad_accum="
            f"{cfg.train.grad_accum}) is not divisible by the data-parallel size data*fsdp={batch_ways}"
        )
    return data, fsdp, tensor


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks a YAML value against a field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(annotation, value, key + ".")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` as a string; accept it as the number the user meant.
            return float(value)
        except ValueError:
            pass
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if isinstance(annotation, type) and annotation is not Any:
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _unknown_key(key: str, prefix: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in types_:
            raise _unknown_key(str(key), prefix, list(types_))
        kwargs[key] = _coerce(prefix + key, value, types_[key])
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node_cls: type = Config
    node = raw
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        types_ = _field_types(node_cls)
        prefix = ".".join(parts[:depth]) + ("." if depth else "")
        if part not in types_:
            raise _unknown_key(part, prefix, list(types_))
        if depth == len(parts) - 1:
            node[part] = value
            return
        node_cls = types_[part]
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"config key '{prefix}{part}' is a value, not a section")
        node = node.setdefault(part, {})


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        out.append((key.strip(), yaml.safe_load(text) if text.strip() else ""))
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (yaml.safe_load only), applies `key.sub=value` overrides, validates."""
    return _build(Config, load_raw(path, overrides))


def explicit_keys(path: str | Path | None, overrides: list[str] = ()) -> set[str]:
    """The dotted keys a YAML config and its overrides set explicitly (finetuning refuses explicit
    changes to the base model's shape, whatever the defaults are)."""
    keys = set()
    for key, value in load_raw(path, overrides).items():
        if isinstance(value, dict) and dataclasses.is_dataclass(_field_types(Config).get(key)):
            keys |= {f"{key}.{sub}" for sub in value}
        else:
            keys.add(str(key))
    return keys


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The nested dict of a YAML config with its overrides applied, not yet checked."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A Config from a nested dict (e.g. a checkpoint's saved config), checked like a YAML file."""
    return _build(Config, raw)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf field, read from the docstrings under each field."""
    import ast
    import inspect

    source = inspect.getsource(cls)
    tree = ast.parse(source)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    rows = []
    defaults = cls()
    for name, annotation in _field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            rows += field_docs(annotation, f"{prefix}{name}.")
            continue
        type_name = getattr(annotation, "__name__", str(annotation))
        if typing.get_origin(annotation) is typing.Literal:
            type_name = "one of " + ", ".join(map(str, typing.get_args(annotation)))
        elif isinstance(annotation, types.GenericAlias):
            type_name = str(annotation)
        rows.append((prefix + name, type_name, getattr(defaults, name), docs.get(name, "")))
    return rows


def config_reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in field_docs():
        lines.append(f"| `{key}` | {type_name} | `{default!r}` | {' '.join(doc.split())} |")
    return "\n".join(lines)
