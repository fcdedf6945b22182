"""Per-task decoding: catalogue-restricted ranking, candidate ranking, choice scoring, text generation.

Every function takes rendered prompts (strings), runs batched and sorted by length (so padding stays small), and
returns results in the prompts' original order.

Restricted ranking walks a prefix trie over the token ids of every valid item (plus EOS): a beam can only ever
spell a real catalogue item, so no generated item is invalid, and since beam hypotheses are distinct token
sequences and each item has one spelling, no item is returned twice. When every item is a single token (``token``
id form with random/sequential ids) a beam search of width K over "item, EOS" reduces to the top-K of one masked
decoder step, which is what :func:`rank_items` computes then (exactly the beam ranking up to the near-zero
log P(EOS | item) term); multi-token ids go through :func:`trie_beam_search`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class ItemTrie:
    """Prefix trie over the token-id spelling of items; ``spell[item]`` ends with EOS."""

    spell: dict[str, tuple[int, ...]]
    eos_id: int
    children: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    leaf: dict[tuple[int, ...], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        children: dict[tuple[int, ...], set[int]] = {}
        for item, ids in self.spell.items():
            if ids in self.leaf:
                raise ValueError(f"items {self.leaf[ids]!r} and {item!r} tokenize identically: {ids}")
            self.leaf[ids] = item
            for i in range(len(ids)):
                children.setdefault(ids[:i], set()).add(ids[i])
        self.children = {k: sorted(v) for k, v in children.items()}
        self._mask_cache: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def from_surfaces(cls, tokenizer, surfaces: dict[str, str]) -> "ItemTrie":
        """Build from ``{raw item: surface text}`` using the tokenizer that the model was trained with."""
        raws = list(surfaces)
        enc = tokenizer([surfaces[r] for r in raws], add_special_tokens=False).input_ids
        eos = tokenizer.eos_token_id
        return cls({r: tuple(ids) + (eos,) for r, ids in zip(raws, enc)}, eos)

    def subset(self, items: Sequence[str]) -> "ItemTrie":
        return ItemTrie({i: self.spell[i] for i in items}, self.eos_id)

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 2 for ids in self.spell.values())

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        return self.children.get(prefix, [self.eos_id] if prefix in self.leaf else [])

    def item_of(self, ids: Sequence[int]) -> str | None:
        ids = tuple(int(i) for i in ids)
        if ids in self.leaf:
            return self.leaf[ids]
        return self.leaf.get(ids + (self.eos_id,))

    def first_tokens(self) -> dict[int, str]:
        """For a single-token trie: token id -> item."""
        return {ids[0]: item for item, ids in self.spell.items()}


def _batches(sources: Sequence[str], batch_size: int, desc: str | None):
    """Yield (indices, texts) batches sorted by length; a progress bar when ``desc`` is given."""
    order = np.argsort([len(s) for s in sources], kind="stable")
    starts = range(0, len(order), batch_size)
    # shown in logs too (not only on a terminal): a full-catalogue evaluation of 22k users takes minutes
    tty = sys.stderr.isatty()
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=tty, mininterval=0.5 if tty else 30):
        idx = order[start : start + batch_size]
        yield idx, [sources[i] for i in idx]


def _encode(tokenizer, texts, max_length, device):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def first_step_logits(model, enc) -> torch.Tensor:
    """Log-probabilities of the first decoded token, [batch, vocab]."""
    start = torch.full((enc["input_ids"].shape[0], 1), model.config.decoder_start_token_id, device=model.device)
    out = model(**enc, decoder_input_ids=start)
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)


@torch.no_grad()
def rank_items(
    model,
    tokenizer,
    sources: Sequence[str],
    trie: ItemTrie | Sequence[ItemTrie],
    k: int = 20,
    batch_size: int = 32,
    num_beams: int | None = None,
    exclude: Sequence[Sequence[str]] | None = None,
    max_source_length: int = 256,
    desc: str | None = None,
) -> list[list[tuple[str, float]]]:
    """Top-``k`` items (with log-probabilities) per prompt, restricted to ``trie`` (one trie, or one per prompt).

    ``exclude`` removes given items (e.g. the history) from each prompt's answers; with a multi-token trie they
    are pruned from a per-prompt sub-trie before decoding, so the beams are not wasted on them.
    """
    model.eval()
    per_prompt = not isinstance(trie, ItemTrie)
    results: list[list[tuple[str, float]]] = [[] for _ in sources]
    base_tries = list(trie) if per_prompt else None
    for idx, texts in _batches(sources, batch_size, desc):
        enc = _encode(tokenizer, texts, max_source_length, model.device)
        tries = [base_tries[i] if per_prompt else trie for i in idx]
        if exclude is not None:
            tries = [_without(t, exclude[i]) for t, i in zip(tries, idx)]
        if all(t.single_token for t in tries):
            logp = first_step_logits(model, enc)
            for row, (i, t) in enumerate(zip(idx, tries)):
                tok_to_item = t.first_tokens()
                ids = torch.tensor(list(tok_to_item), dtype=torch.long)
                top = min(k, len(ids))
                vals, pos = torch.topk(logp[row, ids], top)
                results[i] = [(tok_to_item[int(ids[p])], float(v)) for v, p in zip(vals, pos)]
            continue
        if per_prompt:
            # Each prompt has its own few candidates: rank them exactly by full-sequence log-likelihood
            # (one encoder pass, teacher-forced decoder over every candidate) instead of a beam search.
            for i, ranked in zip(idx, _rank_by_loglik(model, enc, tries, k)):
                results[i] = ranked
            continue
        beams = min(num_beams or k, max(len(t.spell) for t in tries))
        for i, ranked in zip(idx, trie_beam_search(model, enc, tries, beams)):
            results[i] = ranked[:k]
    return results


@torch.no_grad()
def _rank_by_loglik(model, enc, tries: Sequence[ItemTrie], k: int) -> list[list[tuple[str, float]]]:
    """Top-``k`` items of each prompt's trie by log P(item spelling, EOS | prompt), computed exactly."""
    from transformers.modeling_outputs import BaseModelOutput

    hidden = model.get_encoder()(**enc).last_hidden_state
    out = []
    for row, trie in enumerate(tries):
        items = list(trie.spell)
        if not items:
            out.append([])
            continue
        width = max(len(trie.spell[i]) for i in items)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for j, item in enumerate(items):
            ids = trie.spell[item]
            labels[j, : len(ids)] = torch.tensor(ids)
        labels = labels.to(model.device)
        n = len(items)
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden[row : row + 1].expand(n, -1, -1)),
            attention_mask=enc["attention_mask"][row : row + 1].expand(n, -1),
            labels=labels,
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        score = (tok * (labels != -100)).sum(-1)
        top = torch.topk(score, min(k, n))
        out.append([(items[int(i)], float(v)) for v, i in zip(top.values, top.indices)])
    return out


@torch.no_grad()
def trie_beam_search(model, enc, tries: Sequence[ItemTrie], beams: int) -> list[list[tuple[str, float]]]:
    """Beam search that only walks each prompt's item trie; items with their log P(spelling + EOS | prompt).

    Scores are exact sums of full-vocabulary log-probabilities (as ``generate`` with ``length_penalty=0``), but
    the beam bookkeeping only touches each beam's few allowed children instead of the whole vocabulary, the
    encoder and the cross-attention keys run once per prompt (not once per beam), and the decoder keeps its
    cache. ``beams`` unfinished hypotheses are kept per prompt at every step; finished items are collected
    and returned best first. With ``beams`` >= the number of items the search is exhaustive.
    """
    from transformers.modeling_outputs import BaseModelOutput

    device = model.device
    n_prompts, neg_inf = len(tries), float("-inf")
    hidden = model.get_encoder()(**enc).last_hidden_state
    enc_h, enc_mask = hidden, enc["attention_mask"]
    rows: list[tuple[int, tuple[int, ...]] | None] = [(b, ()) for b in range(n_prompts)]  # (prompt, prefix)
    scores = torch.zeros(n_prompts, device=device)
    tokens = torch.full((n_prompts, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    cache = None
    finished: list[list[tuple[str, float]]] = [[] for _ in tries]
    depth = max((len(s) for t in tries for s in t.spell.values()), default=0)
    for step in range(depth):
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc_h), attention_mask=enc_mask,
                    decoder_input_ids=tokens, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # the full-vocabulary normaliser, read once
        allowed = [tries[r[0]].allowed(r[1]) if r is not None else [] for r in rows]
        lens = np.fromiter((len(a) for a in allowed), dtype=np.int64, count=len(allowed))
        width = int(lens.max()) if len(lens) else 0
        if width == 0:
            break
        valid = np.arange(width)[None, :] < lens[:, None]
        ids = np.zeros((len(rows), width), dtype=np.int64)
        ids[valid] = [x for a in allowed for x in a]
        cand = scores[:, None] + logits.gather(1, torch.from_numpy(ids).to(device)) - lse
        cand = cand.masked_fill(~torch.from_numpy(valid).to(device), neg_inf)
        per = len(rows) // n_prompts  # rows per prompt: 1 at the first step, ``beams`` after
        top_v, top_i = cand.view(n_prompts, per * width).topk(min(2 * beams, per * width), dim=1)
        new_rows, src, new_tok, new_scores = [], [], [], []
        for b, (vals, flats) in enumerate(zip(top_v.tolist(), top_i.tolist())):
            trie, kept = tries[b], 0
            for v, flat in zip(vals, flats):
                if v == neg_inf or kept == beams:
                    break
                r = b * per + flat // width
                tok = allowed[r][flat % width]
                prefix = rows[r][1] + (tok,)
                if tok == trie.eos_id:
                    finished[b].append((trie.leaf[prefix], v))
                    continue
                new_rows.append((b, prefix))
                src.append(r)
                new_tok.append(tok)
                new_scores.append(v)
                kept += 1
            for _ in range(beams - kept):  # empty slots keep the layout rectangular
                new_rows.append(None)
                src.append(b * per)
                new_tok.append(trie.eos_id)
                new_scores.append(neg_inf)
        if all(r is None for r in new_rows):
            break
        rows = new_rows
        src_rows = torch.tensor(src, device=device)
        if step == 0:  # one row per prompt becomes ``beams`` rows per prompt, cross-attention keys included
            cache.reorder_cache(src_rows)
            enc_h, enc_mask = hidden.repeat_interleave(beams, 0), enc_mask.repeat_interleave(beams, 0)
        else:  # beams never leave their prompt, so the cross-attention keys stay where they are
            cache.self_attention_cache.reorder_cache(src_rows)
        tokens = torch.tensor(new_tok, device=device)[:, None]
        scores = torch.tensor(new_scores, device=device)
    return [sorted(f, key=lambda x: -x[1]) for f in finished]


def _without(trie: ItemTrie, items: Sequence[str]) -> ItemTrie:
    drop = set(items)
    if not drop.intersection(trie.spell):
        return trie
    return ItemTrie({i: s for i, s in trie.spell.items() if i not in drop}, trie.eos_id)


@torch.no_grad()
def choice_logprobs(
    model,
    tokenizer,
    sources: Sequence[str],
    choices: Sequence[str],
    batch_size: int = 64,
    max_source_length: int = 256,
    desc: str | None = None,
) -> np.ndarray:
    """Log P(choice | prompt) for each prompt and each of a small fixed set of answers, [n_prompts, n_choices].

    Full-sequence log-likelihood by teacher forcing, so multi-token answers ("dislike") are scored properly.
    """
    model.eval()
    choice_ids = [tokenizer(c).input_ids for c in choices]  # with EOS
    width = max(len(c) for c in choice_ids)
    labels = torch.full((len(choices), width), -100, dtype=torch.long)
    for j, ids in enumerate(choice_ids):
        labels[j, : len(ids)] = torch.tensor(ids)
    out = np.zeros((len(sources), len(choices)), dtype=np.float64)
    for idx, texts in _batches(sources, batch_size, desc):
        enc = _encode(tokenizer, texts, max_source_length, model.device)
        encoder_out = model.get_encoder()(**enc)
        n = len(idx)
        for j in range(len(choices)):
            lab = labels[j].unsqueeze(0).expand(n, -1).contiguous().to(model.device)
            logits = model(
                encoder_outputs=encoder_out, attention_mask=enc["attention_mask"], labels=lab
            ).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            mask = lab != -100
            tok = torch.gather(logp, 2, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out[idx, j] = (tok * mask).sum(-1).cpu().numpy()
    return out


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    sources: Sequence[str],
    max_new_tokens: int = 32,
    num_beams: int = 1,
    batch_size: int = 32,
    max_source_length: int = 256,
    desc: str | None = None,
) -> list[str]:
    """Greedy (or beam) decoding of free text, one string per prompt."""
    model.eval()
    results = [""] * len(sources)
    for idx, texts in _batches(sources, batch_size, desc):
        enc = _encode(tokenizer, texts, max_source_length, model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            results[i] = text.strip()
    return results
