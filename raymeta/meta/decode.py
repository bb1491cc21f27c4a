"""Greedy decoding with any forward function (plain, adapted or teacher model)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from raymeta.data.batches import Tokens

Forward = Callable[[Tokens], torch.Tensor]
"""Maps a batch ``[N, T]`` to next-token logits ``[N, T, V]``."""


@torch.no_grad()
def greedy_decode(
    forward: Forward, prompts: Tokens, max_new_tokens: int, eos_id: int | None, pad_id: int
) -> list[list[int]]:
    """Greedy continuation of right-padded ``prompts`` ``[N, T]``.

    Returns per row the generated ids, stopping after EOS (which is kept) or at
    ``max_new_tokens``. No KV cache: answers here are a few tokens long."""
    n, t = prompts.input_ids.shape
    dev = prompts.input_ids.device
    ids = torch.full((n, t + max_new_tokens), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    ids[:, :t], mask[:, :t] = prompts.input_ids, prompts.attention_mask
    lengths = prompts.attention_mask.sum(-1)
    out: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        logits = forward(Tokens(ids[:, :width], mask[:, :width]))
        nxt = logits[rows, lengths - 1].argmax(-1)
        live = ~done
        ids[rows[live], lengths[live]] = nxt[live]
        mask[rows[live], lengths[live]] = 1
        for i in torch.nonzero(live).flatten().tolist():
            out[i].append(int(nxt[i]))
        lengths = lengths + live.long()
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()):
            break
    return out


def model_forward(model) -> Forward:
    """The plain model as a Forward (positions counted over real tokens)."""

    def forward(batch: Tokens) -> torch.Tensor:
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits

    return forward
