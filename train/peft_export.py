"""`flaxpod export RUN --adapters-only`: a LoRA run's adapters as a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors with PEFT's key names), which
`peft.PeftModel.from_pretrained(base, DIR)` loads onto the base run's Hugging Face export.

Llama family only: GPT-2's q, k, v live in one fused Conv1D (`c_attn`) in transformers, which PEFT adapts
as a whole; export a GPT-2 LoRA run merged instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flaxpod.model.errors import InputError

# Our target -> the transformers Llama submodule it adapts.
LLAMA_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "up": "mlp.up_proj",
    "gate": "mlp.gate_proj",
    "down": "mlp.down_proj",
}


def peft_tensors(params: dict, cfg) -> dict[str, np.ndarray]:
    """PEFT state dict of host `params`: per layer and target, lora_A.weight [r, in] and lora_B.weight
    [out, r] (torch Linear layout, our [in, r] / [r, out] transposed, heads flattened)."""
    m = cfg.model
    blocks = params["blocks"]
    r = m.lora.rank
    out: dict[str, np.ndarray] = {}
    for target in m.lora.targets:
        module = LLAMA_MODULES[target]
        adapters = blocks["attn" if module.startswith("self_attn") else "mlp"]["lora"]
        a, b = (
            np.asarray(adapters[target + "_lora_a"], np.float32),
            np.asarray(adapters[target + "_lora_b"], np.float32),
        )
        for i in range(m.n_layer):
            key = f"base_model.model.model.layers.{i}.{module}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    if m.num_labels:  # the classification head trains in full: PEFT's modules_to_save
        out["base_model.model.score.weight"] = np.ascontiguousarray(np.asarray(params["cls_head"], np.float32).T)
    return out


def adapter_config(cfg, base: str) -> dict:
    lora = cfg.model.lora
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if cfg.model.num_labels else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(LLAMA_MODULES[t].split(".")[-1] for t in lora.targets),
        "modules_to_save": ["score"] if cfg.model.num_labels else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def export_adapters(params: dict, cfg, out: Path, base: str) -> list[str]:
    """Writes the PEFT adapter directory of a LoRA run's host `params`; returns the files written."""
    from safetensors.numpy import save_file

    if cfg.model.family != "llama":
        raise InputError(
            f"--adapters-only: {cfg.model.family} runs cannot be written as PEFT adapters (transformers fuses "
            f"GPT-2's q, k, v into one c_attn); export the run merged"
        )
    if cfg.model.lora.train_fully:
        raise InputError(
            f"--adapters-only: finetune.lora.train_fully={cfg.model.lora.train_fully} trained base weights too, "
            f"which an adapter directory does not hold; export the run merged"
        )
    tensors = peft_tensors(params, cfg)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(cfg, base), indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["adapter_config.json", "adapter_model.safetensors"]
