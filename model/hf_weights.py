"""Hugging Face <-> flaxpod weight and config mapping for the GPT-2 and Llama families (numpy only).

Our parameters are stacked over layers and keep heads as their own axis:
q [L, d, H, Dh], k/v [L, d, KV, Dh], o [L, H, Dh, d], up/gate [L, d, F], down [L, F, d], embed [V, d].
Hugging Face's Llama uses torch Linear weights [out, in] (q_proj [H*Dh, d]); its GPT-2 uses Conv1D
weights [in, out] with q, k and v fused in c_attn [d, 3d]. Both use RoPE's "rotate half" layout,
as we do, so no permutation of q/k rows is needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flaxpod.model.config import ModelConfig

GPT2_ARCH, LLAMA_ARCH = "GPT2LMHeadModel", "LlamaForCausalLM"
# A bidirectional llama-family model (masked-LM encoder) is exactly EuroBERT: the same RMSNorm, rotate-half
# RoPE, SwiGLU, GQA, pre-norm blocks, head on the final norm and weight names, with attention not causal.
ENCODER_ARCH = "EuroBertForMaskedLM"
SUPPORTED = {"gpt2": GPT2_ARCH, "llama": LLAMA_ARCH}
# GPT-2's "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation our MLP uses.
# Names transformers' ACT2FN maps to the same function as ours: the tanh approximation of GELU
# (NewGELUActivation, GELUTanh, FastGELUActivation, AccurateGELUActivation) for gpt2, and SiLU (nn.SiLU) for llama.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")
SILU_ACTIVATIONS = ("silu", "swish")


# ---------------------------------------------------------------------------------------------
# flaxpod -> Hugging Face


def check_exportable(cfg: ModelConfig) -> None:
    """Refuses models Hugging Face's class of the family cannot express exactly."""
    if cfg.family == "gpt2" and cfg.kv_heads != cfg.n_head:
        raise ValueError(
            f"model.n_kv_head={cfg.n_kv_head}: GPT2LMHeadModel has no grouped-query attention "
            f"(it needs n_kv_head == n_head={cfg.n_head}); this gpt2-family model cannot be exported"
        )
    if cfg.bidirectional and cfg.family != "llama":
        raise ValueError(
            f"model.family={cfg.family}: only llama-family encoders export to {ENCODER_ARCH}; use --format safetensors"
        )


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, dtype: str) -> dict:
    """config.json for the family's Hugging Face class."""
    check_exportable(cfg)
    common = {
        "architectures": [SUPPORTED[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # what transformers 4.x reads
    }
    if cfg.family == "gpt2":
        return {
            **common,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.max_len,
            "n_inner": cfg.mlp_width,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "initializer_range": cfg.init_std,
        }
    if cfg.bidirectional:
        common.update(architectures=[ENCODER_ARCH], model_type="eurobert")
    return {
        **common,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
    }


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter tree (numpy) -> Hugging Face state dict (float32 numpy, contiguous).

    A gpt2-family model trained with bias=false is exported with zero biases, which is exact:
    GPT2LMHeadModel always has them.
    """
    check_exportable(cfg)
    p = params
    blocks = params["blocks"]
    out: dict[str, np.ndarray] = {}
    d, h, kv, hd, f = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_width

    def flat(x: np.ndarray, *shape: int) -> np.ndarray:
        return np.asarray(x, np.float32).reshape(shape)

    if cfg.family == "gpt2":
        out["transformer.wte.weight"] = p["embed"]
        out["transformer.wpe.weight"] = p["pos_embed"]
        fn = p["final_norm"]
        out["transformer.ln_f.weight"] = fn["scale"]
        out["transformer.ln_f.bias"] = fn.get("bias", np.zeros(d))
        attn, mlp = blocks["attn"], blocks["mlp"]
        for i in range(cfg.n_layer):
            pre = f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[pre + theirs + ".weight"] = blocks[ours]["scale"][i]
                out[pre + theirs + ".bias"] = blocks[ours]["bias"][i] if "bias" in blocks[ours] else np.zeros(d)
            out[pre + "attn.c_attn.weight"] = np.concatenate([flat(attn[n][i], d, h * hd) for n in "qkv"], axis=1)
            if "q_bias" in attn:
                out[pre + "attn.c_attn.bias"] = np.concatenate([flat(attn[n + "_bias"][i], h * hd) for n in "qkv"])
            else:
                out[pre + "attn.c_attn.bias"] = np.zeros(3 * d)
            out[pre + "attn.c_proj.weight"] = flat(attn["o"][i], h * hd, d)
            out[pre + "attn.c_proj.bias"] = attn["o_bias"][i] if "o_bias" in attn else np.zeros(d)
            out[pre + "mlp.c_fc.weight"] = mlp["up"][i]
            out[pre + "mlp.c_fc.bias"] = mlp["up_bias"][i] if "up_bias" in mlp else np.zeros(f)
            out[pre + "mlp.c_proj.weight"] = mlp["down"][i]
            out[pre + "mlp.c_proj.bias"] = mlp["down_bias"][i] if "down_bias" in mlp else np.zeros(d)
    else:
        out["model.embed_tokens.weight"] = p["embed"]
        out["model.norm.weight"] = p["final_norm"]["scale"]
        attn, mlp = blocks["attn"], blocks["mlp"]
        for i in range(cfg.n_layer):
            pre = f"model.layers.{i}."
            out[pre + "input_layernorm.weight"] = blocks["attn_norm"]["scale"][i]
            out[pre + "post_attention_layernorm.weight"] = blocks["mlp_norm"]["scale"][i]
            out[pre + "self_attn.q_proj.weight"] = flat(attn["q"][i], d, h * hd).T
            out[pre + "self_attn.k_proj.weight"] = flat(attn["k"][i], d, kv * hd).T
            out[pre + "self_attn.v_proj.weight"] = flat(attn["v"][i], d, kv * hd).T
            out[pre + "self_attn.o_proj.weight"] = flat(attn["o"][i], h * hd, d).T
            out[pre + "mlp.gate_proj.weight"] = np.asarray(mlp["gate"][i]).T
            out[pre + "mlp.up_proj.weight"] = np.asarray(mlp["up"][i]).T
            out[pre + "mlp.down_proj.weight"] = np.asarray(mlp["down"][i]).T
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.asarray(p["lm_head"]).T
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Hugging Face -> flaxpod


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _rope_theta(config: dict, where: str) -> float:
    """RoPE base read as transformers 5 reads it (PreTrainedConfig.convert_rope_params_to_dict):
    a non-empty `rope_scaling` replaces `rope_parameters`, and theta comes from the chosen dict,
    else the top-level `rope_theta`, else 10000. Scaled RoPE in either field is refused."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, entry in (("rope_parameters", params), ("rope_scaling", scaling)):
        if _rope_type(entry) != "default":
            raise ValueError(
                f"{where}: {key} has rope type {_rope_type(entry)!r}; flaxpod supports only rope_type default"
            )
    chosen = scaling or params
    return float(chosen.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_config_from_hf(config: dict, where: str) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json; anything we cannot run exactly is refused."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    encoder = model_type == "eurobert" and (not archs or archs[0] == ENCODER_ARCH)
    if encoder:  # EuroBERT is the llama family with bidirectional attention (see ENCODER_ARCH)
        model_type, archs = "llama", [LLAMA_ARCH]
    if model_type not in SUPPORTED or (archs and archs[0] not in SUPPORTED.values()):
        raise ValueError(
            f"{where}: unsupported architecture {archs[0] if archs else model_type!r} (model_type={model_type!r}); "
            f"supported: {', '.join([*SUPPORTED.values(), ENCODER_ARCH])}"
        )
    tie = bool(config.get("tie_word_embeddings", model_type == "gpt2"))
    if model_type == "gpt2":
        act = config.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise ValueError(f"{where}: activation_function {act!r} is not supported (expected gelu_new)")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if config.get(key):
                raise ValueError(f"{where}: {key}=true is not supported")
        if config.get("scale_attn_weights", True) is False:
            raise ValueError(f"{where}: scale_attn_weights=false is not supported")
        d, n_pos = config.get("n_embd", 768), config.get("n_positions", 1024)
        return ModelConfig(
            family="gpt2",
            n_layer=config.get("n_layer", 12),
            n_head=config.get("n_head", 12),
            d_model=d,
            d_ff=config.get("n_inner") or 4 * d,
            seq_len=min(n_pos, 2048),
            max_seq_len=n_pos,
            vocab_size=config.get("vocab_size", 50257),
            bias=True,
            tie_embeddings=tie,
            norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (flaxpod's llama family has no biases)")
    if config.get("hidden_act", "silu") not in SILU_ACTIVATIONS:
        raise ValueError(
            f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (expected one of {SILU_ACTIVATIONS})"
        )
    if (config.get("pretraining_tp") or 1) != 1:
        raise ValueError(f"{where}: pretraining_tp={config['pretraining_tp']} is not supported (expected 1)")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ValueError(
            f"{where}: head_dim={head_dim} with {heads} heads does not make hidden_size={d}; "
            "flaxpod needs head_dim == hidden_size / num_attention_heads"
        )
    n_pos = config.get("max_position_embeddings", 2048)
    return ModelConfig(
        family="llama",
        n_layer=config["num_hidden_layers"],
        n_head=heads,
        n_kv_head=config.get("num_key_value_heads") or heads,
        d_model=d,
        d_ff=config["intermediate_size"],
        seq_len=min(n_pos, 2048),
        max_seq_len=n_pos,
        vocab_size=config["vocab_size"],
        bias=False,
        tie_embeddings=tie,
        rope_theta=_rope_theta(config, where),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        bidirectional=encoder,
    )


class _Tensors:
    """Looks tensors up by name (with or without a `transformer.`/`model.` prefix), checks their
    shape, and reports names never used (which would mean weights were silently dropped)."""

    def __init__(self, tensors: dict[str, np.ndarray], where: str):
        self.tensors, self.where, self.used = tensors, where, set()

    def get(self, name: str, shape: tuple[int, ...], alternatives: tuple[str, ...] = ()) -> np.ndarray:
        for candidate in (name, *alternatives):
            if candidate in self.tensors:
                x = np.asarray(self.tensors[candidate], np.float32)
                if x.shape != shape:
                    raise ValueError(f"{self.where}: tensor {candidate} has shape {x.shape}, expected {shape}")
                self.used.add(candidate)
                return x
        raise ValueError(f"{self.where}: tensor {name} is missing")

    def has(self, name: str) -> bool:
        return name in self.tensors

    def unused(self) -> list[str]:
        # Causal-mask buffers and rotary caches are not weights.
        skip = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
        return sorted(k for k in self.tensors if k not in self.used and not k.endswith(skip))


def from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str) -> dict:
    """Hugging Face state dict -> our parameter tree (float32 numpy), shapes checked."""
    t = _Tensors(tensors, where)
    d, h, n, v = cfg.d_model, cfg.n_head, cfg.n_layer, cfg.vocab_size
    kv, hd, f = cfg.kv_heads, cfg.head_dim, cfg.mlp_width

    def stack(fn) -> np.ndarray:
        return np.stack([fn(i) for i in range(n)])

    if cfg.family == "gpt2":

        def g(name: str, shape: tuple[int, ...]) -> np.ndarray:
            return t.get("transformer." + name, shape, (name,))

        c_attn = stack(lambda i: g(f"h.{i}.attn.c_attn.weight", (d, 3 * d)))
        c_attn_b = stack(lambda i: g(f"h.{i}.attn.c_attn.bias", (3 * d,)))
        qw, kw, vw = np.split(c_attn, 3, axis=2)
        qb, kb, vb = np.split(c_attn_b, 3, axis=1)
        params = {
            "embed": g("wte.weight", (v, d)),
            "pos_embed": g("wpe.weight", (cfg.max_len, d)),
            "final_norm": {"scale": g("ln_f.weight", (d,)), "bias": g("ln_f.bias", (d,))},
            "blocks": {
                "attn_norm": {
                    "scale": stack(lambda i: g(f"h.{i}.ln_1.weight", (d,))),
                    "bias": stack(lambda i: g(f"h.{i}.ln_1.bias", (d,))),
                },
                "mlp_norm": {
                    "scale": stack(lambda i: g(f"h.{i}.ln_2.weight", (d,))),
                    "bias": stack(lambda i: g(f"h.{i}.ln_2.bias", (d,))),
                },
                "attn": {
                    "q": qw.reshape(n, d, h, hd),
                    "k": kw.reshape(n, d, h, hd),
                    "v": vw.reshape(n, d, h, hd),
                    "o": stack(lambda i: g(f"h.{i}.attn.c_proj.weight", (d, d))).reshape(n, h, hd, d),
                    "q_bias": qb.reshape(n, h, hd),
                    "k_bias": kb.reshape(n, h, hd),
                    "v_bias": vb.reshape(n, h, hd),
                    "o_bias": stack(lambda i: g(f"h.{i}.attn.c_proj.bias", (d,))),
                },
                "mlp": {
                    "up": stack(lambda i: g(f"h.{i}.mlp.c_fc.weight", (d, f))),
                    "up_bias": stack(lambda i: g(f"h.{i}.mlp.c_fc.bias", (f,))),
                    "down": stack(lambda i: g(f"h.{i}.mlp.c_proj.weight", (f, d))),
                    "down_bias": stack(lambda i: g(f"h.{i}.mlp.c_proj.bias", (d,))),
                },
            },
        }
    else:

        def g(name: str, shape: tuple[int, ...]) -> np.ndarray:
            return t.get("model." + name, shape, (name,))

        def lin(i: int, name: str, out: int, inp: int) -> np.ndarray:
            return g(f"layers.{i}.{name}.weight", (out, inp)).T

        params = {
            "embed": g("embed_tokens.weight", (v, d)),
            "final_norm": {"scale": g("norm.weight", (d,))},
            "blocks": {
                "attn_norm": {"scale": stack(lambda i: g(f"layers.{i}.input_layernorm.weight", (d,)))},
                "mlp_norm": {"scale": stack(lambda i: g(f"layers.{i}.post_attention_layernorm.weight", (d,)))},
                "attn": {
                    "q": stack(lambda i: lin(i, "self_attn.q_proj", h * hd, d)).reshape(n, d, h, hd),
                    "k": stack(lambda i: lin(i, "self_attn.k_proj", kv * hd, d)).reshape(n, d, kv, hd),
                    "v": stack(lambda i: lin(i, "self_attn.v_proj", kv * hd, d)).reshape(n, d, kv, hd),
                    "o": stack(lambda i: lin(i, "self_attn.o_proj", d, h * hd)).reshape(n, h, hd, d),
                },
                "mlp": {
                    "gate": stack(lambda i: lin(i, "mlp.gate_proj", f, d)),
                    "up": stack(lambda i: lin(i, "mlp.up_proj", f, d)),
                    "down": stack(lambda i: lin(i, "mlp.down_proj", d, f)),
                },
            },
        }
    if not cfg.tie_embeddings:
        params["lm_head"] = t.get("lm_head.weight", (v, d)).T
    elif t.has("lm_head.weight"):
        t.used.add("lm_head.weight")  # a tied head saved explicitly: the same values as the embedding
    unused = t.unused()
    if unused:
        raise ValueError(f"{where}: tensors not used by a {cfg.family} model: {', '.join(unused[:5])}")
    return params


def drop_zero_biases(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """A gpt2-family import whose biases are all exactly zero (as `flaxpod export` writes for a
    bias=false model) becomes a bias=false model again: the same function, and export -> import
    gives back the original parameter tree."""
    if cfg.family != "gpt2":
        return params, cfg
    blocks = params["blocks"]
    biases = [params["final_norm"]["bias"], blocks["attn_norm"]["bias"], blocks["mlp_norm"]["bias"]]
    biases += [v for k, v in {**blocks["attn"], **blocks["mlp"]}.items() if k.endswith("_bias")]
    if any(np.any(b != 0) for b in biases):
        return params, cfg

    def strip(tree: dict) -> dict:
        return {
            k: strip(v) if isinstance(v, dict) else v
            for k, v in tree.items()
            if k != "bias" and not k.endswith("_bias")
        }

    return strip(params), dataclasses.replace(cfg, bias=False)
