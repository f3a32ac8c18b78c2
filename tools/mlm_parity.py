"""Exports a masked-LM run to EuroBertForMaskedLM and compares it with transformers: the max |logit diff| on a
few sentences and the top-5 fills of [MASK] from flaxpod and from transformers.

    python -m tools.mlm_parity RUN_DIR OUT_DIR
"""

import sys

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from flaxpod.train.export import run_export
from flaxpod.train.mlm_eval import fill_mask
from flaxpod.train.run_dir import load_run
from transformers import AutoModelForMaskedLM

run_dir, out = sys.argv[1], sys.argv[2]
run_export(run_dir, out)
run = load_run(run_dir)
hf = AutoModelForMaskedLM.from_pretrained(out).eval()
model = nnx.merge(run.graphdef, run.params)
sentences = [
    "The [MASK] of the house was open.",
    "And God said, Let there be [MASK].",
    "She was the [MASK] of the family.",
]
worst = 0.0
ours_fills = fill_mask(run, sentences, 5)
for text, fills in zip(sentences, ours_fills, strict=True):
    ids = run.tokenizer.encode(text.replace(" [MASK]", "[MASK]"))
    ours = np.asarray(model(jnp.asarray([ids])))[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    worst = max(worst, float(np.abs(ours - theirs).max()))
    t = ids.index(hf.config.mask_token_id)
    probs = torch.softmax(torch.tensor(theirs[t]), -1).numpy()
    top = np.argsort(-probs)[:5]
    print(f"{text}\n  flaxpod:      " + "  ".join(f"{p!r} {q:.3f}" for p, q in fills[0]))
    print("  transformers: " + "  ".join(f"{run.tokenizer.decode([int(i)])!r} {probs[i]:.3f}" for i in top))
print(f"{type(hf).__name__}: max |logit diff| over {len(sentences)} sentences = {worst:.2e}")
