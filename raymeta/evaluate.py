"""NC / Prompt / FT evaluation of a model over a triple set, with the shortcut controls.

Settings (each test triple i scored with the model's greedy answer and the NLL of r_i):
  NC             q_i alone
  Prompt         c_i + q_i
  FT             one inner update (lr η, ``inner_steps`` steps) on c_i, then q_i
  FT_irrelevant  the update on c_j of another fact j, then q_i: accuracy = r_i,
                 leak = the answer is r_j (the recency shortcut)
  FT2            the update on c_i and c_j together, then q_i: accuracy = r_i, leak = r_j
The partner j of i is drawn (seeded, the same for every model evaluated) among the triples
with another context and another response (see ``partners``).
Accuracy: the greedy answer, normalised (lower case, no punctuation, single
spaces), equals the normalised response or starts with it followed by a space.
Per-example records are kept for later reports (e.g. the paper's Table 4).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

import torch

from raymeta.data.batches import (
    Tokens,
    context_batch,
    pad_id,
    prompt_batch,
    prompt_text,
    scoring_batch,
)
from raymeta.data.triples import Triple
from raymeta.errors import InputError
from raymeta.meta.decode import greedy_decode, model_forward
from raymeta.meta.engines import Engine
from raymeta.meta.inner import InnerSpec, double_backward_attention
from raymeta.meta.losses import token_nll
from raymeta.progress import Progress

SETTINGS = ("NC", "Prompt", "FT", "FT_irrelevant", "FT2")
PAIRED = ("FT_irrelevant", "FT2")
"""The settings that pair each test fact with another one (its partner)."""
EVAL_PROGRESS_S = 30.0
"""An evaluation setting prints a progress line at its end and every this many seconds."""
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def matches(prediction: str, response: str) -> bool:
    """The normalised prediction equals the response or starts with it (word boundary)."""
    p, r = normalise(prediction), normalise(response)
    return bool(r) and (p == r or p.startswith(r + " "))


def partners(triples: Sequence[Triple], seed: int) -> list[int]:
    """The partner j of each triple i in the paired settings: another triple with a different
    context and a different (normalised) response, so that FT_irrelevant's update never sees
    c_i (several SQuAD questions share a paragraph) and a leak, answering r_j, is told apart
    from a correct answer.

    Seeded: in a shuffled order each triple takes the next one that qualifies, so where every
    context and response is distinct this is a derangement (each triple is one triple's
    partner). InputError naming a triple that has no such partner."""
    n = len(triples)
    if n < 2:
        raise InputError(f"eval: {n} test triple(s) cannot be paired with another (need >= 2)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    keys = [(t.context.strip(), normalise(t.response)) for t in triples]
    out = [0] * n
    for k, i in enumerate(order):
        for step in range(1, n):
            j = order[(k + step) % n]
            if keys[j][0] != keys[i][0] and keys[j][1] != keys[i][1]:
                out[i] = j
                break
        else:
            raise InputError(
                f"eval.settings: {', '.join(PAIRED)} pair each test triple with one of another "
                f"context and another response, but test triple {i} (query "
                f"{triples[i].query[:60]!r}) has none among the {n} evaluated: evaluate more "
                "triples (eval.n_examples) or leave those settings out of eval.settings"
            )
    return out


def eval_partners(triples: Sequence[Triple], cfg, seed: int) -> list[int] | None:
    """:func:`partners` of the evaluated ``triples`` when ``cfg.settings`` (an EvalConfig's)
    has a paired setting, else None (InputError as there)."""
    if not any(s in PAIRED for s in cfg.settings):
        return None
    return partners(triples, seed + 12345)


def eval_triples(triples: Sequence[Triple], cfg) -> list[Triple]:
    """The test triples evaluated: the first ``cfg.n_examples`` (0 = all) of ``triples``.

    InputError when none are left, or one while ``cfg.settings`` has a paired setting."""
    chosen = list(triples[: cfg.n_examples] if cfg.n_examples else triples)
    where = f"{len(triples)} test triple(s), eval.n_examples={cfg.n_examples}"
    if not chosen:
        raise InputError(f"eval: no test triples to evaluate ({where})")
    paired = [s for s in cfg.settings if s in PAIRED]
    if paired and len(chosen) < 2:
        raise InputError(
            f"eval.settings: {', '.join(paired)} pair each test fact with another one, but "
            f"only {len(chosen)} test triple is evaluated ({where}); give at least 2 or "
            "leave them out of eval.settings"
        )
    return chosen


def decode_text(tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]


def score_batch(tokenizer, forward, prefixes, responses, max_new_tokens, device):
    """(predictions, response NLLs) for one batch; ``forward`` maps [N,T] → logits."""
    scored = scoring_batch(tokenizer, prefixes, responses).to(device)
    with torch.no_grad():
        nll, _ = token_nll(forward(scored), scored.labels)
    prompts = prompt_batch(tokenizer, prefixes).to(device)
    answers = greedy_decode(
        forward, prompts, max_new_tokens, tokenizer.eos_token_id, pad_id(tokenizer)
    )
    return [decode_text(tokenizer, a) for a in answers], nll.tolist()


def adapted_forward(model, engine: Engine, state):
    """The adapted models of B tasks as a Forward over ``[B, T]`` (row b → task b)."""

    def forward(batch: Tokens) -> torch.Tensor:
        b = batch.input_ids.shape[0]
        with torch.no_grad(), double_backward_attention():
            return engine.logits(model, state, batch.view_lead(b, 1))[:, 0]

    return forward


def plain_forward(model):
    fwd = model_forward(model)

    def forward(batch: Tokens) -> torch.Tensor:
        with torch.no_grad():
            return fwd(batch)

    return forward


def run_setting(model, tokenizer, triples, setting, partner, engine, spec, cfg, device, prog):
    """Records of one setting over all ``triples``."""
    records = []
    bs = cfg.batch_size
    for start in range(0, len(triples), bs):
        idx = list(range(start, min(start + bs, len(triples))))
        batch = [triples[i] for i in idx]
        others = [triples[partner[i]] for i in idx] if setting in PAIRED else batch
        prefixes = [t.query for t in batch]
        if setting == "NC":
            forward = plain_forward(model)
        elif setting == "Prompt":
            forward = plain_forward(model)
            prefixes = [prompt_text(t.context, t.query) for t in batch]
        else:
            if setting == "FT":
                groups = [[t.context] for t in batch]
            elif setting == "FT_irrelevant":
                groups = [[o.context] for o in others]
            else:
                groups = [[t.context, o.context] for t, o in zip(batch, others)]
            ctx = context_batch(tokenizer, groups).to(device)
            with torch.enable_grad(), double_backward_attention():
                state = engine.adapt(model, ctx, spec)
            forward = adapted_forward(model, engine, state)
        preds, nlls = score_batch(
            tokenizer, forward, prefixes, [t.response for t in batch], cfg.max_new_tokens, device
        )
        for i, t, o, p, nll in zip(idx, batch, others, preds, nlls):
            rec = {
                "index": i,
                "setting": setting,
                "prediction": p,
                "response": t.response,
                "correct": matches(p, t.response),
                "nll": nll,
            }
            if setting in PAIRED:
                rec["other"] = partner[i]
                rec["leak"] = matches(p, o.response) and normalise(o.response) != normalise(
                    t.response
                )
            if "heldout_query" in t.meta:
                rec["heldout_query"] = t.meta["heldout_query"]
            records.append(rec)
        prog.update(len(records), len(idx))
    return records


def summarise(records: Sequence[dict]) -> dict[str, float]:
    """accuracy, nll (and leak) averaged over records; ``n`` counts them."""
    n = max(1, len(records))
    out = {
        "accuracy": sum(r["correct"] for r in records) / n,
        "nll": sum(r["nll"] for r in records) / n,
    }
    if records and "leak" in records[0]:
        out["leak"] = sum(r["leak"] for r in records) / n
    held = [r for r in records if r.get("heldout_query")]
    if held:
        out["accuracy_heldout_queries"] = sum(r["correct"] for r in held) / len(held)
    out["n"] = len(records)
    return out


def evaluate(
    model,
    tokenizer,
    triples: Sequence[Triple],
    cfg,
    engine: Engine,
    spec: InnerSpec,
    device="cpu",
    label: str = "eval",
    seed: int = 0,
    quiet: bool = False,
) -> tuple[dict, list[dict]]:
    """Metrics per setting and the per-example records. ``cfg``: an EvalConfig.

    ``spec`` gives the FT settings' inner update (its lr, steps, parameters); the
    update is first order here since no outer gradient is taken."""
    triples = eval_triples(triples, cfg)
    partner = eval_partners(triples, cfg, seed)
    if spec is not None:
        spec = InnerSpec(lr=spec.lr, names=spec.names, steps=spec.steps, second_order=False)
    was_training = model.training
    model.eval()
    metrics, records = {}, []
    for setting in cfg.settings:
        prog = Progress(  # a line at the end, and every 30 s before it (a long evaluation)
            f"{label} {setting}",
            len(triples),
            every=10**9,
            unit="examples",
            quiet=quiet,
            every_s=EVAL_PROGRESS_S,
        )
        recs = run_setting(
            model, tokenizer, triples, setting, partner, engine, spec, cfg, device, prog
        )
        metrics[setting] = summarise(recs)
        records += recs
    model.train(was_training)
    return metrics, records
