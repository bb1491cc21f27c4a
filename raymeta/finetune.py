"""Plain supervised fine-tuning in the NC and Prompt formats (the paper's preparation, 4.3)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from raymeta.data.batches import prompt_text, scoring_batch
from raymeta.data.triples import Triple
from raymeta.progress import Progress


def format_examples(triples: Sequence[Triple]) -> list[tuple[str, str]]:
    """Each triple twice: (query, response) for NC and (context + query, response) for Prompt."""
    out = []
    for t in triples:
        out.append((t.query, t.response))
        out.append((prompt_text(t.context, t.query), t.response))
    return out


def prepare(model, tokenizer, train: Sequence[Triple], cfg, seed: int = 0, device="cpu") -> dict:
    """Fine-tune ``model`` in place on a seeded subset (``cfg``: a PrepareConfig).

    Loss on the response tokens and EOS only; AdamW at a constant lr."""
    if cfg.steps == 0:
        return {"steps": 0}
    rng = random.Random(seed + 3)
    subset = rng.sample(list(train), min(cfg.n_examples, len(train)))
    examples = format_examples(subset)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    prog = Progress("prepare", cfg.steps, every=max(1, cfg.steps // 4), unit="examples")
    model.train()
    loss_ema = None
    for step in range(1, cfg.steps + 1):
        batch = rng.sample(examples, min(cfg.batch_size, len(examples)))
        tok = scoring_batch(
            tokenizer, [b[0] for b in batch], [b[1] for b in batch], add_eos=True
        ).to(device)
        out = model(
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            position_ids=tok.position_ids,
            labels=tok.labels,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = out.loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * out.loss.item()
        prog.update(step, len(batch), loss=loss_ema)
    model.eval()
    return {"steps": cfg.steps, "loss": loss_ema, "examples": len(examples)}
