"""Token batches for the three formats and for inner steps.

Formats (``+`` is concatenation with a space):
* NC: ``query`` → ``response``;
* Prompt: ``context + query`` → ``response``;
* context: the context alone (the inner step's language-modelling text).

Sequences start with the tokenizer's BOS token when it has one. Every batch
is right-padded (left padding leaves pad rows with nothing to attend to, which
HF eager attention turns into NaN in float64); greedy decoding writes each
row's next token after its own last real token. ``labels`` hold -100 everywhere except the scored tokens (the
response, optionally followed by EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Tokens:
    """A padded batch. Shapes: ``[*lead, T]`` for every field (lead = [B] or [B, m])."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over real tokens: ``[*lead, T]``."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def to(self, device) -> Tokens:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Tokens(move(self.input_ids), move(self.attention_mask), move(self.labels))

    def flat(self) -> Tokens:
        """Merge every leading dimension: ``[B, m, T]`` → ``[B*m, T]``."""
        t = self.input_ids.shape[-1]
        lab = None if self.labels is None else self.labels.reshape(-1, t)
        return Tokens(self.input_ids.reshape(-1, t), self.attention_mask.reshape(-1, t), lab)

    def view_lead(self, *lead: int) -> Tokens:
        """Reshape the leading dims: ``[N, T]`` → ``[*lead, T]``."""
        t = self.input_ids.shape[-1]
        lab = None if self.labels is None else self.labels.reshape(*lead, t)
        return Tokens(self.input_ids.reshape(*lead, t), self.attention_mask.reshape(*lead, t), lab)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def prefix_ids(tokenizer, prefix: str) -> list[int]:
    """BOS + ``prefix``: the part of a sequence the model conditions on."""
    return bos(tokenizer) + encode(tokenizer, prefix)


def target_ids(tokenizer, target: str, add_eos: bool) -> list[int]:
    """`` target`` (with a leading space) and, if asked, EOS."""
    ids = encode(tokenizer, " " + target.strip())
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def pad(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    side: str,
    label_from: Sequence[int] | None = None,
    length: int | None = None,
) -> Tokens:
    """Pad id lists to one length. ``label_from[i]``: first scored position of row i.

    A row's first token is never scored (no token of the row predicts it; in a left-padded row
    a pad would), so left and right padding give the same losses.
    Returns input_ids/attention_mask/labels ``[N, T]``; labels exist iff label_from is given."""
    t = max([len(s) for s in seqs] + [length or 1])
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.long) if label_from else None
    for i, s in enumerate(seqs):
        off = t - len(s) if side == "left" else 0
        ids[i, off : off + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, off : off + len(s)] = 1
        if labels is not None:
            start = max(label_from[i], 1)
            labels[i, off + start : off + len(s)] = torch.tensor(s[start:], dtype=torch.long)
    return Tokens(ids, mask, labels)


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def scoring_batch(
    tokenizer, prefixes: Sequence[str], targets: Sequence[str], add_eos: bool = False
) -> Tokens:
    """``prefix + target`` rows, right-padded, labels on the target tokens. ``[N, T]``."""
    seqs, starts = [], []
    for p, r in zip(prefixes, targets):
        a = prefix_ids(tokenizer, p)
        seqs.append(a + target_ids(tokenizer, r, add_eos))
        starts.append(len(a))
    return pad(seqs, pad_id(tokenizer), "right", label_from=starts)


def prompt_batch(tokenizer, prefixes: Sequence[str]) -> Tokens:
    """Prefixes only, right-padded, for greedy decoding. ``[N, T]``."""
    return pad([prefix_ids(tokenizer, p) for p in prefixes], pad_id(tokenizer), "right")


def context_batch(tokenizer, groups: Sequence[Sequence[str]]) -> Tokens:
    """Inner-step texts: ``groups[b]`` are the contexts of task b, updated on together.

    Returns ``[B, n, Tc]`` right-padded with labels on every real token (the
    first token, BOS, is never predicted). All groups must have the same size n."""
    n = len(groups[0])
    if any(len(g) != n for g in groups):
        raise ValueError("every task of a batch needs the same number of contexts")
    flat = [prefix_ids(tokenizer, c) for g in groups for c in g]
    out = pad(flat, pad_id(tokenizer), "right", label_from=[0] * len(flat))
    return out.view_lead(len(groups), n)


def truncate(tokens: Tokens, length: int | None) -> Tokens:
    """The first ``length`` positions of every row of ``tokens`` ``[*lead, T]`` (as it is when
    ``length`` is None or not shorter)."""
    if length is None or tokens.input_ids.shape[-1] <= length:
        return tokens
    labels = tokens.labels[..., :length] if tokens.labels is not None else None
    return Tokens(tokens.input_ids[..., :length], tokens.attention_mask[..., :length], labels)


def lm_batch(tokenizer, texts: Sequence[str], max_len: int = 0, add_eos: bool = True) -> Tokens:
    """Plain LM texts (regulariser, pretraining), right-padded, every token scored. ``[N, T]``."""
    seqs = []
    for t in texts:
        ids = prefix_ids(tokenizer, t)
        if add_eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        seqs.append(ids[:max_len] if max_len else ids)
    return pad(seqs, pad_id(tokenizer), "right", label_from=[0] * len(seqs))


def prompt_text(context: str, query: str) -> str:
    """The Prompt format's prefix: the context(s) then the query."""
    return f"{context.strip()} {query.strip()}"


def extend(prefixes: Tokens, answers: Sequence[Sequence[int]], pad_token: int) -> Tokens:
    """Append ``answers[i]`` to the real tokens of ``prefixes`` row i; labels on the answers. ``[N, T']``."""
    seqs, starts = [], []
    for i, a in enumerate(answers):
        real = prefixes.input_ids[i][prefixes.attention_mask[i].bool()].tolist()
        seqs.append(real + list(a))
        starts.append(len(real))
    out = pad(seqs, pad_token, "right", label_from=starts)
    return out.to(prefixes.input_ids.device)


def longest_sequences(
    tokenizer, triples: Sequence, answer_tokens: int, prompt_contexts: int = 1
) -> tuple[int, int]:
    """``(length, index)`` of the longest sequence the job feeds a model for ``triples`` and
    the triple it comes from. Per triple, the longest of: BOS + the context (an inner step);
    BOS + the query, then the longer of the response (+ EOS) and ``answer_tokens`` greedily
    decoded tokens; and when ``prompt_contexts`` > 0 the same with the Prompt prefix (context
    + query) in front. ``prompt_contexts`` > 1: prompts of that many contexts joined (the LC
    teacher with ``lc_teacher_context=all``), bounded with the longest contexts. (0, -1) for no
    triples."""
    if not triples:
        return 0, -1

    def counts(texts):
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    start = len(bos(tokenizer))
    context = counts(t.context for t in triples)
    answer = [max(n + 1, answer_tokens) for n in counts(" " + t.response.strip() for t in triples)]
    query = counts(t.query for t in triples)
    lengths = [max(c, q + a) for c, q, a in zip(context, query, answer)]
    if prompt_contexts:
        prefix = counts(prompt_text(t.context, t.query) for t in triples)
        extra = sum(sorted(context)[len(context) - prompt_contexts + 1 :]) + prompt_contexts - 1
        lengths = [max(n, p + extra + a) for n, p, a in zip(lengths, prefix, answer)]
    index = max(range(len(lengths)), key=lengths.__getitem__)
    return start + lengths[index], index
