"""SFT examples -> token ids with a response-only loss mask -> packed training and evaluation batches.

Reading and rendering: `data.sft_format`; packing: `data.sft_packing`; answers: `data.sft_answers`.

Tokenizing. Each segment of an example is encoded on its own (so a prompt has the same ids here
as when it is encoded alone for generation), and every response segment is followed by the
tokenizer's EOS id. Response tokens and their EOS carry the loss; prompt tokens do not. No BOS is
added (pretraining streams have none). As rows use inputs = tokens[:-1] and targets = tokens[1:],
the loss mask is over targets: mask[j] is 1 when tokens[j + 1] is a response token or EOS.

Truncation policy. An example must fit in seq_len + 1 tokens (seq_len inputs and targets). A
longer one is cut from the left: its first tokens (the prompt, and in chats the earliest turns)
are removed until it fits, provided its final response (with EOS) stays whole with at least one
token before it; otherwise it is dropped. Why: a response cut at its end would teach the model to
stop nowhere (its EOS is gone), and one with no context at all would teach answers to no question;
the end of the prompt, next to the response, is the part a response depends on most. Examples with
no response target at all are dropped too. `SFTStats` counts both, for the trainer to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from flaxpod.data.sft_format import Example, SFTEvalPair
from flaxpod.data.sft_packing import Batch, SFTTrainIterator, TokenizedExample, eval_batches
from flaxpod.data.tokenizer import Tokenizer
from flaxpod.model.errors import InputError

DEFAULT_PACKING_BINS = 256


@dataclass(frozen=True)
class SFTStats:
    """What tokenization kept, cut and dropped (all counts of examples unless said otherwise)."""

    examples: int
    kept: int
    truncated: int  # kept, with tokens cut from the left
    dropped: int  # final response (with EOS and one token of context) longer than seq_len + 1
    tokens: int  # tokens of the kept examples, after truncation
    loss_tokens: int  # targets carrying the loss in the kept examples
    longest: int  # tokens of the longest example before truncation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def require_eos(tokenizer: Tokenizer) -> int:
    """The tokenizer's EOS id; SFT refuses a tokenizer without one (flaxpod's char tokenizer)."""
    if tokenizer.eos_id is None:
        raise InputError(
            f"tokenizer: the {tokenizer.kind!r} tokenizer has no EOS token; SFT ends every response with EOS "
            "so that generation learns to stop: use a base model with a sentencepiece tokenizer"
        )
    return tokenizer.eos_id


def _encode(texts: list[str], tokenizer: Tokenizer, examples: Sequence[Example], owners: list[int]) -> list[list[int]]:
    try:
        return tokenizer.encode_batch(texts)
    except ValueError as e:  # the char tokenizer refuses unknown characters; name the example
        for text, owner in zip(texts, owners, strict=True):
            try:
                tokenizer.encode(text)
            except ValueError:
                raise InputError(f"{examples[owner].where}: the tokenizer cannot encode this example: {e}") from None
        raise


def _token_ids(segment_ids: list[list[int]], responses: list[bool], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, is_response per token) of one example's encoded segments."""
    tokens: list[int] = []
    flags: list[bool] = []
    for ids, is_response in zip(segment_ids, responses, strict=True):
        ids = ids + [eos] if is_response else ids
        tokens += ids
        flags += [is_response] * len(ids)
    return np.asarray(tokens, np.int32), np.asarray(flags, bool)


def _fit(tokens: np.ndarray, is_response: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The example cut to seq_len + 1 tokens by the module's policy, or None when it is dropped."""
    budget = seq_len + 1
    if len(tokens) > budget:
        # Start of the final response: the last token that is not a response token, plus one.
        final_start = len(is_response) - int(np.argmin(is_response[::-1])) if not is_response.all() else 0
        if len(tokens) - final_start + 1 > budget:
            return None
        tokens, is_response = tokens[-budget:], is_response[-budget:]
    mask = is_response[1:].astype(np.float32)
    return (tokens, mask) if mask.any() else None


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int
) -> tuple[list[TokenizedExample], SFTStats]:
    """Token ids and target loss masks of the examples that fit (see the module docstring).

    Raises InputError when the tokenizer has no EOS, cannot encode an example, or when no example
    keeps a response target within seq_len + 1 tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    if not examples:
        raise InputError("SFT data: no examples")
    eos = require_eos(tokenizer)
    texts = [s.text for e in examples for s in e.segments]
    owners = [k for k, e in enumerate(examples) for _ in e.segments]
    encoded = _encode(texts, tokenizer, examples, owners)
    kept: list[TokenizedExample] = []
    truncated = longest = 0
    at = 0
    for example in examples:
        n = len(example.segments)
        tokens, is_response = _token_ids(encoded[at : at + n], [s.is_response for s in example.segments], eos)
        at += n
        longest = max(longest, len(tokens))
        fitted = _fit(tokens, is_response, seq_len)
        if fitted is not None:
            truncated += len(fitted[0]) < len(tokens)
            kept.append(TokenizedExample(*fitted))
    if not kept:
        raise InputError(
            f"{examples[0].path}: none of its {len(examples)} examples keeps a response token within seq_len + 1 "
            f"= {seq_len + 1} tokens (longest example: {longest} tokens): raise model.seq_len or shorten responses"
        )
    stats = SFTStats(
        examples=len(examples),
        kept=len(kept),
        truncated=truncated,
        dropped=len(examples) - len(kept),
        tokens=sum(len(e.tokens) for e in kept),
        loss_tokens=int(sum(e.loss_mask.sum() for e in kept)),
        longest=longest,
    )
    return kept, stats


def encode_prompt(pair: SFTEvalPair, tokenizer: Tokenizer) -> list[int]:
    """The prompt's ids exactly as in training (earlier responses followed by EOS), to generate from."""
    eos = require_eos(tokenizer)
    ids: list[int] = []
    for segment, seg_ids in zip(pair.context, tokenizer.encode_batch([s.text for s in pair.context]), strict=True):
        ids += seg_ids + [eos] if segment.is_response else seg_ids
    return ids


def make_sft_train_iterator(
    tokenized: Sequence[TokenizedExample],
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    packing_bins: int = DEFAULT_PACKING_BINS,
) -> SFTTrainIterator:
    """Endless iterator of this process's rows of each packed global batch.

    Each epoch reshuffles the examples with (seed, epoch) and packs them whole, first fit over
    `packing_bins` open rows (more bins: less padding); rows are shuffled too. Batches are dicts of
    [global_batch_size // process_count, seq_len] arrays: inputs, targets, segment_ids, positions
    (int32) and loss_mask (float32). Process p gets rows p, p + P, ... of each global batch, so
    the processes' rows are disjoint and together the one-process batch. `get_state()` is a
    JSON-able dict; `set_state()` resumes exactly, also with another process count.
    """
    return SFTTrainIterator(
        tokenized,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        packing_bins=packing_bins,
    )


def make_sft_eval_batches(
    tokenized: Sequence[TokenizedExample],
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    packing_bins: int = DEFAULT_PACKING_BINS,
    max_batches: int | None = None,
) -> list[Batch]:
    """This process's rows of fixed batches covering every validation example once (layout as in training).

    The last batch is filled up with empty rows (loss_mask 0); `max_batches` keeps only the first ones.
    """
    return eval_batches(
        tokenized,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        packing_bins=packing_bins,
        max_batches=max_batches,
    )
