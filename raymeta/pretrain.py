"""The offline tiny model: tokenizer + small Llama trained from scratch on the task texts.

The tiny model must be a language model of the task texts that *reads its
prompt* (the LC teacher depends on it). Plain fact texts leave it on the loss
plateau before induction forms (see docs/tiny_demo.md); two
kinds of text make it form early: "fresh facts" (Prompt-format sequences of
newly sampled random facts, which cannot be memorised) and copy sequences
(random token strings repeated once, loss on the repeat only).

Text kinds of the mix (``pretrain.mix`` weights):
  context  the training contexts
  prompt   context + query + response of training facts
  nc       query + response of training facts
  prompt2  two training facts' contexts + a query about one of them + its response
  fresh    1-3 newly sampled facts' contexts + a query about one + its response
           (generated sets only; test names and descriptions excluded)
  copy     a random token string, then the same string (loss on the repeat)
Pretraining stops when Prompt accuracy on held-out facts reaches the target: fresh facts for
the generated sets; for the others (SQuAD, WikiText, a user's JSONL) the last tenth of the
training triples (at most 200), which pretraining then never sees (``held_out_facts``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from raymeta.config import MIX_KINDS as KINDS
from raymeta.data import generate
from raymeta.data.batches import (
    Tokens,
    lm_batch,
    pad,
    pad_id,
    prefix_ids,
    prompt_text,
    truncate,
)
from raymeta.data.triples import Triple, content_hash
from raymeta.progress import Progress

RECIPE = 2
"""Version of the pretraining recipe, part of the cache key (2: sets without a generator
validate on training triples held out of pretraining, not on trained ones)."""


PROGRESS_EVERY = 250
"""Pretraining prints a progress line every this many steps between its accuracy checks."""


def tiny_cache_key(cfg, train: Sequence[Triple], test: Sequence[Triple]) -> str:
    """A hash of everything that determines the tiny model: the data set kind and the
    content of the train/test triples it is trained on (so an edited file or another
    filter gives another model), its shape and the pretraining settings."""
    from dataclasses import asdict

    blob = json.dumps(
        {
            "data": [cfg.data.dataset, content_hash(train), content_hash(test)],
            "shape": asdict(cfg.model.tiny),
            "pretrain": asdict(cfg.pretrain),
            "recipe": RECIPE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tokenizer_texts(dataset: str, train: Sequence[Triple], test: Sequence[Triple]) -> list[str]:
    """Texts the tiny tokenizer is trained on: the task texts (and generator vocabulary)."""
    texts = [f"{t.context} {t.query} {t.response}" for t in list(train) + list(test)]
    if dataset in generate.CONTEXTS:
        texts += generate.template_texts(dataset)
    return texts


class TextSampler:
    """Samples pretraining sequences of each kind; see the module docstring."""

    def __init__(
        self, dataset: str, train: Sequence[Triple], test: Sequence[Triple], tokenizer, seed: int
    ):
        self.dataset, self.train, self.tok = dataset, list(train), tokenizer
        self.rng = random.Random(seed)
        self.generated = dataset in generate.CONTEXTS
        if self.generated:
            held = {t.meta.get("name") for t in test} | {t.meta.get("description") for t in test}
            self.names = [n for n in generate.all_names() if n not in held]
            self.descs = [d for d in generate.all_descriptions() if d not in held]
        self.vocab_ids = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]

    def fresh_fact(self) -> Triple:
        fact = generate.Fact(self.rng.choice(self.names), self.rng.choice(self.descs))
        return generate.fact_triple(fact, self.dataset, self.rng, False, -1)

    def text(self, kind: str) -> str:
        """One text of ``kind`` (every kind but copy)."""
        t = self.rng.choice(self.train)
        if kind == "context":
            return t.context
        if kind == "prompt":
            return f"{prompt_text(t.context, t.query)} {t.response}"
        if kind == "nc":
            return f"{t.query} {t.response}"
        if kind == "prompt2":
            facts = [t, self.rng.choice(self.train)]
            return self.multi_fact_prompt(facts)
        if kind == "fresh":
            facts = [self.fresh_fact() for _ in range(self.rng.randint(1, 3))]
            return self.multi_fact_prompt(facts)
        raise ValueError(f"pretrain.mix: unknown text kind {kind!r} (known: {KINDS})")

    def multi_fact_prompt(self, facts: list[Triple]) -> str:
        asked = self.rng.choice(facts)
        ctx = " ".join(f.context for f in self.rng.sample(facts, len(facts)))
        return f"{prompt_text(ctx, asked.query)} {asked.response}"

    def copy_ids(self) -> tuple[list[int], int]:
        """BOS + s + s for a random token string s; returns ids and the first scored index."""
        s = [self.rng.choice(self.vocab_ids) for _ in range(self.rng.randint(4, 12))]
        head = prefix_ids(self.tok, "")
        return head + s + s, len(head) + len(s)

    def batch(self, size: int, mix: dict[str, float]) -> Tokens:
        """``size`` sequences drawn by the mix weights, right-padded, labels set. ``[N, T]``."""
        kinds = [k for k, w in mix.items() if w > 0 and (self.generated or k != "fresh")]
        weights = [mix[k] for k in kinds]
        picks = self.rng.choices(kinds, weights, k=size)
        texts = [self.text(k) for k in picks if k != "copy"]
        rows = [self.copy_ids() for k in picks if k == "copy"]
        if not rows:
            return lm_batch(self.tok, texts)
        plain = lm_batch(self.tok, texts) if texts else None
        seqs = [r[0] for r in rows]
        starts = [r[1] for r in rows]
        if plain is not None:
            for ids, mask in zip(plain.input_ids, plain.attention_mask):
                seqs.append(ids[mask.bool()].tolist())
                starts.append(0)
        return pad(seqs, pad_id(self.tok), "right", label_from=starts)


def validation_facts(sampler: TextSampler, n: int) -> list[Triple]:
    """Held-out fresh facts for measuring Prompt accuracy (never trained on as such)."""
    rng_state = sampler.rng.getstate()
    sampler.rng.seed(987_654_321)
    facts = [sampler.fresh_fact() for _ in range(n)]
    sampler.rng.setstate(rng_state)
    return facts


def held_out_facts(train: Sequence[Triple], n: int = 200) -> tuple[list[Triple], list[Triple]]:
    """(triples to pretrain on, triples to validate on) for a set without a generator: the
    last tenth of ``train``, at most ``n``, is held out of pretraining, so that its Prompt
    accuracy measures reading the prompt, not memory. Below 10 triples nothing is held out
    (validation then scores trained triples, and the log says so)."""
    k = min(n, len(train) // 10)
    if k == 0:
        return list(train), list(train[:n])
    return list(train[:-k]), list(train[-k:])


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def pretrain_tiny(model, tokenizer, dataset, train, test, cfg, device, prompt_accuracy) -> dict:
    """Train ``model`` from scratch; ``prompt_accuracy(model, triples) -> float``.

    Returns a report: steps run, final loss, Prompt accuracy history, seconds."""
    torch.manual_seed(cfg.seed)
    if dataset in generate.CONTEXTS:
        sampler = TextSampler(dataset, train, test, tokenizer, cfg.seed)
        val = validation_facts(sampler, 200)
        held = f"{len(val)} fresh facts"
    else:
        pool, val = held_out_facts(train)
        held = (
            f"{len(val)} training triples held out of pretraining"
            if len(pool) < len(train)
            else f"{len(val)} trained-on training triples (too few to hold any out)"
        )
        sampler = TextSampler(dataset, pool, test, tokenizer, cfg.seed)
    print(f"[pretrain] Prompt accuracy measured on {held}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    prog = Progress("pretrain", cfg.steps, every=cfg.steps + 1, unit="seqs")
    history, loss_ema, step = [], None, 0
    from raymeta.models import position_limit

    limit = position_limit(model.config)  # texts of several joined facts can be longer
    model.train()
    for step in range(1, cfg.steps + 1):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step - 1, cfg.steps, cfg.lr)
        batch = truncate(sampler.batch(cfg.batch_size, cfg.mix), limit).to(device)
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = out.loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * out.loss.item()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = prompt_accuracy(model, val)
            model.train()
            history.append({"step": step, "loss": loss_ema, "prompt_accuracy": acc})
            prog.update(step, cfg.batch_size, force=True, loss=loss_ema, prompt_acc=acc)
            if cfg.target_prompt_accuracy and acc >= cfg.target_prompt_accuracy:
                break
        else:  # a line between the accuracy checks (every PROGRESS_EVERY steps)
            prog.update(step, cfg.batch_size, force=step % PROGRESS_EVERY == 0, loss=loss_ema)
    model.eval()
    report = {
        "steps": step,
        "loss": loss_ema,
        "history": history,
        "seconds": prog.elapsed,
        "validation": held,
    }
    warn_if_short_of_target(report, cfg.target_prompt_accuracy)
    return report


def warn_if_short_of_target(report: dict, target: float, path: Path | None = None) -> None:
    """Print a warning when pretraining (``report``, as :func:`pretrain_tiny` returns it) ended
    at its step cap below ``target`` Prompt accuracy: such a model has not learnt to read its
    prompt, and FT figures measured on it are the recency shortcut's, not a result
    (docs/tiny_demo.md)."""
    history = report.get("history")
    if not target or not history or history[-1]["prompt_accuracy"] >= target:
        return
    where = f" (the cached model {path})" if path else ""
    print(
        f"[pretrain] warning: Prompt accuracy {history[-1]['prompt_accuracy']:.3g} after "
        f"{report['steps']} steps{where} is below pretrain.target_prompt_accuracy={target}: "
        "the tiny model does not read its prompt yet, and FT figures measured on it are "
        "not a result; raise pretrain.steps (another value gives another cached model)",
        flush=True,
    )


def ensure_tiny_model(cfg, train, test, device, prompt_accuracy, tokenizer=None) -> Path:
    """The cached tiny model directory for ``cfg``, building and pretraining it if missing
    (with ``tokenizer`` when the caller already trained it on ``tokenizer_texts``).

    The result is loaded like any other model, through ``from_pretrained``."""
    from raymeta.models import build_tiny_model, count_parameters, save_model, train_tokenizer

    path = Path(cfg.model.tiny_cache_dir) / f"tiny-{tiny_cache_key(cfg, train, test)}"
    if (path / "raymeta.json").is_file():
        print(f"[pretrain] reusing the cached tiny model {path}", flush=True)
        report = json.loads((path / "raymeta.json").read_text()).get("pretrain", {})
        warn_if_short_of_target(report, cfg.pretrain.target_prompt_accuracy, path)
        return path
    tok = tokenizer or train_tokenizer(tokenizer_texts(cfg.data.dataset, train, test))
    model = build_tiny_model(cfg.model.tiny, len(tok), seed=cfg.pretrain.seed).to(device)
    n = count_parameters(model)
    print(f"[pretrain] tiny Llama: {n / 1e6:.2f}M parameters, vocabulary {len(tok)}", flush=True)
    report = pretrain_tiny(
        model, tok, cfg.data.dataset, train, test, cfg.pretrain, device, prompt_accuracy
    )
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_model(model.cpu(), tok, tmp, info={"pretrain": report})
    if path.exists():  # another process finished the same model first
        shutil.rmtree(tmp)
    else:
        tmp.replace(path)
    return path
