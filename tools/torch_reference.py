"""A PyTorch eager twin of flaxpod's transformer, for benchmarks and parity checks.

nanoGPT-style: one fused qkv Linear per block, causal attention through
F.scaled_dot_product_attention, LayerNorm (optionally without bias), learned positions, GELU
(tanh), tied head for the gpt2 family; RMSNorm, rotate-half RoPE, SwiGLU and grouped-query
attention for the llama family. Weights are loaded from flaxpod's pure-dict parameter tree, so
both frameworks start from the same model and the first-step losses must agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from flaxpod.model.config import ModelConfig
from flaxpod.train.config import OptimConfig
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight).to(x.dtype)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.is_llama:
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.has_bias)


def _rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * freqs  # [T, half]
    return torch.cos(angles), torch.sin(angles)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D] in the rotate-half layout (as flaxpod and Hugging Face's Llama)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class TorchBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, kv, hd = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
        bias = cfg.has_bias
        self.n_head, self.n_kv, self.head_dim = h, kv, hd
        self.attn_norm = _norm(cfg)
        self.qkv = nn.Linear(d, (h + 2 * kv) * hd, bias=bias)
        self.o = nn.Linear(h * hd, d, bias=bias)
        self.mlp_norm = _norm(cfg)
        f = cfg.mlp_width
        self.gated = cfg.is_llama
        self.up = nn.Linear(d, f, bias=bias)
        self.gate = nn.Linear(d, f, bias=False) if self.gated else None
        self.down = nn.Linear(f, d, bias=bias)

    def attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, hd = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.qkv(x).split([h * hd, kv * hd, kv * hd], dim=-1)
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, kv, hd).transpose(1, 2)
        v = v.view(b, t, kv, hd).transpose(1, 2)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        # Query head i reads key/value head i // (h // kv), as flaxpod's grouped einsum does.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
        return self.o(y.transpose(1, 2).reshape(b, t, h * hd))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), rope)
        h = self.mlp_norm(x)
        if self.gated:
            h = F.silu(self.gate(h)) * self.up(h)
        else:
            h = F.gelu(self.up(h), approximate="tanh")
        return x + self.down(h)


class TorchTransformer(nn.Module):
    """tokens [B, T] (int64) -> float32 logits [B, T, vocab]; the same model as flaxpod's Transformer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.learned_positions else None
        self.blocks = nn.ModuleList(TorchBlock(cfg) for _ in range(cfg.n_layer))
        self.final_norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.is_llama:
            cos, sin = _rope_tables(cfg, cfg.max_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:t]
        else:
            rope = (self.rope_cos[:t], self.rope_sin[:t])
        for block in self.blocks:
            x = block(x, rope)
        return self.lm_head(self.final_norm(x)).float()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy


def load_flaxpod_params(model: TorchTransformer, params: Mapping) -> None:
    """Copies flaxpod's pure-dict parameters (numpy or jax arrays) into `model`.

    Layouts: q [L, d, H, Dh], k/v [L, d, KV, Dh], o [L, H, Dh, d], up/gate [L, d, F],
    down [L, F, d], embed [V, d], lm_head [d, V]; torch Linear weights are [out, in].
    """
    cfg = model.cfg
    p = {k: v for k, v in params.items()}
    blocks = p["blocks"]
    d = cfg.d_model
    sd: dict[str, torch.Tensor] = {"embed.weight": _t(p["embed"])}
    if model.pos_embed is not None:
        sd["pos_embed.weight"] = _t(p["pos_embed"])
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = _t(np.asarray(p["lm_head"]).T)

    def norm(prefix: str, tree: Mapping, index: int | None) -> None:
        pick = (lambda a: np.asarray(a)) if index is None else (lambda a: np.asarray(a)[index])
        sd[f"{prefix}.weight"] = _t(pick(tree["scale"]))
        if tree.get("bias") is not None:
            sd[f"{prefix}.bias"] = _t(pick(tree["bias"]))

    norm("final_norm", p["final_norm"], None)
    attn, mlp = blocks["attn"], blocks["mlp"]
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}"
        norm(f"{pre}.attn_norm", blocks["attn_norm"], i)
        norm(f"{pre}.mlp_norm", blocks["mlp_norm"], i)
        q, k, v = (np.asarray(attn[n])[i].reshape(d, -1) for n in ("q", "k", "v"))
        sd[f"{pre}.qkv.weight"] = _t(np.concatenate([q, k, v], axis=1).T)
        o = np.asarray(attn["o"])[i]
        sd[f"{pre}.o.weight"] = _t(o.reshape(-1, d).T)
        if attn.get("q_bias") is not None:
            biases = [np.asarray(attn[n])[i].reshape(-1) for n in ("q_bias", "k_bias", "v_bias")]
            sd[f"{pre}.qkv.bias"] = _t(np.concatenate(biases))
            sd[f"{pre}.o.bias"] = _t(np.asarray(attn["o_bias"])[i])
        sd[f"{pre}.up.weight"] = _t(np.asarray(mlp["up"])[i].T)
        sd[f"{pre}.down.weight"] = _t(np.asarray(mlp["down"])[i].T)
        if mlp.get("gate") is not None:
            sd[f"{pre}.gate.weight"] = _t(np.asarray(mlp["gate"])[i].T)
        if mlp.get("up_bias") is not None:
            sd[f"{pre}.up.bias"] = _t(np.asarray(mlp["up_bias"])[i])
            sd[f"{pre}.down.bias"] = _t(np.asarray(mlp["down_bias"])[i])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # With tied embeddings lm_head.weight is embed.weight, so it is legitimately not in `sd`.
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"flaxpod -> torch weights: missing {missing}, unexpected {unexpected}")


def make_torch_optimizer(model: nn.Module, optim: OptimConfig, impl: str = "foreach") -> torch.optim.AdamW:
    """AdamW with flaxpod's hyper-parameters and decay mask: matrices and embeddings decay,
    norm scales and biases (1-D once layers are unstacked) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
    if impl not in flags:
        raise ValueError(f"torch AdamW implementation: expected one of {sorted(flags)}, got {impl!r}")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **flags[impl])


def make_torch_step(
    model: TorchTransformer,
    opt: torch.optim.Optimizer,
    optim: OptimConfig,
    lr_at: Callable[[int], float],
    grad_accum: int = 1,
) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """step(index, inputs, targets) -> detached mean loss before the update; flaxpod's step in
    eager PyTorch: cross entropy (+ z-loss), global-norm clipping, AdamW at lr_at(index)."""
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.cfg.vocab_size

    bf16 = model.cfg.dtype == "bfloat16"

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs).view(-1, vocab)
        ce = F.cross_entropy(logits, targets.reshape(-1))
        if not optim.z_loss:
            return ce, ce
        return ce + optim.z_loss * torch.logsumexp(logits, -1).square().mean(), ce

    def step(index: int, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lr = lr_at(index)
        for group in opt.param_groups:
            group["lr"] = lr
        ce_total = torch.zeros(())
        # Micro-batch a takes rows a, a+A, ... like flaxpod; equal sizes, so the mean of the
        # micro means is the batch mean.
        for a in range(grad_accum):
            objective, ce = loss_of(inputs[a::grad_accum], targets[a::grad_accum])
            (objective / grad_accum).backward()
            ce_total += ce.detach() / grad_accum
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ce_total

    return step


def check_supported(cfg: ModelConfig) -> None:
    """The reference mirrors flaxpod's deterministic step; dropout masks cannot be matched."""
    if cfg.dropout:
        raise ValueError(f"model.dropout: the reference runs deterministic steps; expected 0, got {cfg.dropout}")
