"""Generated continuations for causal LMs: on-policy batches (student samples) and sequence-level KD targets.

Both start from a batch's prompts: the tokens before its first target token (chat / instruction data), or the
first half of a plain text. Prompts are left-padded for `generate`, and the result is re-packed right-padded
(prompt + continuation, up to and including the first eos) with `loss_mask` on the continuation, so training
sees the same layout and position ids as every other batch.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.distill.kernel import Batch


def prompt_lengths(batch: Batch, *, max_prompt: int) -> torch.Tensor:
    """(B,) prompt length per row: before the first loss_mask token, else half the real tokens; >= 1."""
    real = batch["attention_mask"].sum(dim=1)  # (B,)
    if "loss_mask" in batch:
        marked = batch["loss_mask"].bool() & batch["attention_mask"].bool()  # (B, T)
        first = torch.where(marked.any(dim=1), marked.float().argmax(dim=1), real)
        lengths = first
    else:
        lengths = real // 2
    return lengths.clamp(min=1, max=max(1, max_prompt)).minimum(real.clamp_min(1))


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    batch: Batch,
    *,
    max_new_tokens: int,
    max_length: int,
    pad_token_id: int,
    eos_token_id: int | None,
    sample: bool,
    temperature: float = 1.0,
) -> Batch:
    """Continue each row's prompt with `model`; input_ids, attention_mask, loss_mask (B, L) on its device.

    `sample`: multinomial sampling from the full distribution at `temperature` (on-policy); else greedy
    (sequence-level KD targets). Sequences are capped at `max_length` tokens.
    """
    new_tokens = max(1, min(max_new_tokens, max_length - 1))
    lengths = prompt_lengths(batch, max_prompt=max_length - new_tokens)  # (B,)
    ids = batch["input_ids"]
    width = int(lengths.max())
    rows = ids.shape[0]
    prompts = torch.full((rows, width), pad_token_id, dtype=ids.dtype, device=ids.device)  # left-padded
    prompt_mask = torch.zeros((rows, width), dtype=torch.long, device=ids.device)
    for i in range(rows):
        n = int(lengths[i])
        prompts[i, width - n :] = ids[i, :n]
        prompt_mask[i, width - n :] = 1
    was_training = model.training
    model.eval()
    try:
        options: dict[str, object] = {"do_sample": sample}
        if sample:
            options |= {"temperature": temperature, "top_k": 0, "top_p": 1.0}
        output = model.generate(  # type: ignore[operator]
            input_ids=prompts,
            attention_mask=prompt_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=1,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            **options,
        )
    finally:
        model.train(was_training)
    continuations = output[:, width:]  # (B, new)
    pieces: list[tuple[torch.Tensor, int]] = []
    for i in range(rows):
        generated = continuations[i]
        keep = generated.shape[0]
        if eos_token_id is not None:
            hits = (generated == eos_token_id).nonzero()
            if hits.numel():
                keep = int(hits[0, 0]) + 1  # up to and including the first eos
        prompt = ids[i, : int(lengths[i])]
        pieces.append((torch.cat([prompt, generated[:keep]]), prompt.shape[0]))
    length = max(row.shape[0] for row, _ in pieces)
    input_ids = torch.full((rows, length), pad_token_id, dtype=ids.dtype, device=ids.device)
    attention = torch.zeros((rows, length), dtype=torch.long, device=ids.device)
    loss_mask = torch.zeros((rows, length), dtype=torch.long, device=ids.device)
    for i, (row, prompt_length) in enumerate(pieces):
        input_ids[i, : row.shape[0]] = row
        attention[i, : row.shape[0]] = 1
        loss_mask[i, prompt_length : row.shape[0]] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}
