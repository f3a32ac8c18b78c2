"""The model's own config: the fields a user sets and the values derived from them, in one place.

The derived properties (`kv_heads`, `head_dim`, `mlp_width`, `max_len`, the family's features) are
the only place those rules are written; the model, decoding, weight exchange and the trainer read
them instead of recomputing `n_kv_head or n_head` and friends. String choices are `Literal`s: the
YAML loader (train/config.py) and `__post_init__` both refuse a value outside them, naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Literal

from flaxpod.model.errors import ConfigError

Family = Literal["gpt2", "llama"]

# The SwiGLU width 8/3*d_model is rounded up to this multiple. Meta's Llama-1/2 round to 256; flaxpod
# rounds to 64 (SmolLM's widths) and cannot change it: a run directory's config.yaml stores d_ff=0, so
# another rule would change the shape of every existing llama run (resume, evaluate and export would
# fail). Models with other widths set d_ff (configs/llama_*.yaml do).
LLAMA_FF_MULTIPLE = 64


LORA_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
LORA_FULL_GROUPS = ("norms", "embed", "head")


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA adapter rank r; 0: no adapters (full finetuning, the model unchanged)."""
    alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / rank) * x A B, as in the LoRA paper and PEFT."""
    dropout: float = 0.0
    """Dropout on the adapters' input (training only)."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    """Projections that get adapters: any of q, k, v, o (attention), up, gate, down (MLP)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """A's initialisation (B starts at zero): `kaiming` uniform as PEFT's default, or `gaussian` (std 1/rank)."""
    train_fully: list[str] = field(default_factory=list)
    """Besides the adapters (and a classification head), groups trained in full: `norms`, `embed`, `head`."""

    def __post_init__(self) -> None:
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"lora.init: expected one of ['kaiming', 'gaussian'], got {self.init!r}")
        if self.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0 (0: no LoRA), got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or (self.rank and not self.targets):
            raise ConfigError(f"lora.targets: expected a non-empty subset of {list(LORA_TARGETS)}, got {self.targets}")
        bad = [g for g in self.train_fully if g not in LORA_FULL_GROUPS]
        if bad:
            raise ConfigError(f"lora.train_fully: expected any of {list(LORA_FULL_GROUPS)}, got {bad[0]!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: expected a rate in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ModelConfig:
    family: Family = "gpt2"
    """`gpt2` (LayerNorm, learned positions, GELU, tied head) or `llama` (RMSNorm, RoPE, SwiGLU, GQA)."""
    n_layer: int = 4
    """Number of transformer blocks (scanned, so compile time does not grow with depth)."""
    n_head: int = 4
    """Attention (query) heads."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means equal to n_head."""
    d_model: int = 128
    """Residual stream width."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4*d_model for gpt2 and, for llama, int(8/3*d_model) rounded up to a multiple of 64
    (SmolLM-135M: 1536, SmolLM-360M: 2560). Meta's Llama-1/2 round to 256 (7B: 11008): set d_ff for those."""
    seq_len: int = 256
    """Training context length; must not exceed max_seq_len."""
    max_seq_len: int = 0
    """Longest context the model supports (size of learned positions); 0 means seq_len."""
    vocab_size: int = 0
    """Embedding rows; 0 means the tokenizer's vocabulary rounded up to a multiple of 64. Must be >= the tokenizer's."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (gpt2 family only; llama has none)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    dropout: float = 0.0
    """Dropout rate on attention probabilities, residual branches and embeddings."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama family)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype (`float32` or `bfloat16`); parameters stay float32."""
    attention: Literal["einsum", "fused"] = "einsum"
    """Attention kernel: `einsum` (plain XLA, fastest on CPU) or `fused` (jax.nn.dot_product_attention)."""
    attention_impl: Literal["xla", "cudnn"] = "xla"
    """Implementation for `fused` attention: `xla` or `cudnn` (GPU)."""
    remat: Literal["none", "full", "dots"] = "none"
    """Rematerialization of each block in the backward pass: `none`, `full`, or `dots` (save matmul outputs)."""
    scan_layers: bool = True
    """Run the blocks with lax.scan over stacked parameters (fast compile) instead of a Python loop."""
    mlp_chunks: int = 1
    """Compute the MLP in this many blocks of its hidden width, summed (the same function, same parameters):
    on CPU, Eigen's matrix products 384 columns wide ran 20-35% faster than 1536 wide (docs/benchmarks.md).
    Leave 1 on GPU/TPU and with tensor parallelism; must divide the MLP width; not with LoRA."""
    init_std: float = 0.02
    """Standard deviation of weight initialization (output projections are scaled by 1/sqrt(2*n_layer))."""
    num_labels: int = 0
    """Classes of a sequence-classification head (`finetune.task=classify` sets it from the labels); 0: none."""
    pooling: Literal["last", "mean", "first"] = "last"
    """How the classification head pools a row: `last` token (causal models), `mean` over tokens, or `first`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters in the blocks; finetuning copies `finetune.lora` here (rank 0: none)."""
    bidirectional: bool = False
    """Attention sees the whole document, not only the past (masked-LM encoders); train.objective=mlm sets it."""

    def __post_init__(self) -> None:
        for name, allowed in literal_choices(type(self)).items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("n_layer", "n_head", "d_model", "seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)!r}")
        for name in ("n_kv_head", "d_ff", "max_seq_len", "vocab_size", "num_labels"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}: must be >= 0 (0 means derived), got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_kv_head: {self.kv_heads} does not divide model.n_head={self.n_head}")
        if self.max_seq_len and self.seq_len > self.max_seq_len:
            raise ConfigError(
                f"model.seq_len: {self.seq_len} exceeds the model's maximum model.max_seq_len={self.max_seq_len}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a rate in [0, 1), got {self.dropout}")
        if self.mlp_chunks < 1 or self.mlp_width % self.mlp_chunks:
            width, chunks = self.mlp_width, self.mlp_chunks
            raise ConfigError(f"model.mlp_chunks: expected a positive divisor of the MLP width {width}, got {chunks}")
        if self.mlp_chunks > 1 and self.lora.rank:
            # An adapter adds x A B to a whole projection; per block it would need its own slice of B.
            raise ConfigError(
                f"model.mlp_chunks: {self.mlp_chunks} cannot be combined with LoRA (lora.rank > 0); use 1"
            )

    # Shapes -----------------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_head, or n_head without grouped-query attention)."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def max_len(self) -> int:
        """Positions the model supports: max_seq_len, or seq_len when that is 0."""
        return self.max_seq_len or self.seq_len

    @property
    def mlp_width(self) -> int:
        """d_ff, or the family's rule (see the d_ff field)."""
        if self.d_ff:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return LLAMA_FF_MULTIPLE * -(-(8 * self.d_model // 3) // LLAMA_FF_MULTIPLE)

    # What the family implies ----------------------------------------------------------------

    @property
    def is_llama(self) -> bool:
        """RMSNorm, RoPE, SwiGLU MLP, no biases (the llama family)."""
        return self.family == "llama"

    @property
    def learned_positions(self) -> bool:
        """A learned position table of max_len rows (gpt2); llama uses RoPE and has no hard length limit."""
        return self.family == "gpt2"

    @property
    def has_bias(self) -> bool:
        """Biases in linear layers and norms: only the gpt2 family has them, and only with bias=true."""
        return self.bias and self.family == "gpt2"


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple]:
    """{field name: allowed values} for a dataclass's `Literal` fields."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    }
