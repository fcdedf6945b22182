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
    """Prefix trie over the token-id spelling of items; ``spell[item]`` ends with EOS.

    ``eos_id=None`` makes a trie of bare spellings (no EOS), for items inside a sequence (the continuation
    protocol): an item ends where its spelling does, so no spelling may be a prefix of another's
    (collaborative ids are prefix-free by construction).
    """

    spell: dict[str, tuple[int, ...]]
    eos_id: int | None
    children: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    leaf: dict[tuple[int, ...], str] = field(default_factory=dict)
    _table: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _single: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = 1 if self.eos_id is None else 2
        self._single = all(len(ids) == n for ids in self.spell.values())
        distinct = len(set(self.spell.values())) == len(self.spell)
        if self.spell and self._single and self.eos_id is not None and distinct:
            # one token and EOS per item (a case's 100 candidates, thousands of times per evaluation): the same
            # trie as below, built without a set per prefix
            self.leaf = {ids: item for item, ids in self.spell.items()}
            self.children = {(): sorted(ids[0] for ids in self.leaf)}
            self.children.update((ids[:1], [self.eos_id]) for ids in self.leaf)
            return
        children: dict[tuple[int, ...], set[int]] = {}
        for item, ids in self.spell.items():
            if ids in self.leaf:
                raise ValueError(f"items {self.leaf[ids]!r} and {item!r} tokenize identically: {ids}")
            self.leaf[ids] = item
            for i in range(len(ids)):
                children.setdefault(ids[:i], set()).add(ids[i])
        self.children = {k: sorted(v) for k, v in children.items()}
        if self.eos_id is None:
            inner = [ids for ids in self.leaf if ids in self.children]
            if inner:
                raise ValueError(f"item {self.leaf[inner[0]]!r}'s spelling {inner[0]} begins another item's: "
                                 "items in a sequence need prefix-free spellings")

    def bare(self) -> "ItemTrie":
        """The same items spelt without EOS (items inside a sequence)."""
        if self.eos_id is None:
            return self
        return ItemTrie({i: s[:-1] for i, s in self.spell.items()}, None)

    @classmethod
    def from_surfaces(cls, tokenizer, surfaces: dict[str, str]) -> "ItemTrie":
        """Build from ``{raw item: surface text}`` using the tokenizer that the model was trained with."""
        raws = list(surfaces)
        enc = tokenizer([surfaces[r] for r in raws], add_special_tokens=False).input_ids
        eos = tokenizer.eos_token_id
        return cls({r: tuple(ids) + (eos,) for r, ids in zip(raws, enc)}, eos)

    def subset(self, items: Sequence[str]) -> "ItemTrie":
        return ItemTrie({i: self.spell[i] for i in items}, self.eos_id)

    def spelling(self, item: str) -> tuple[int, ...]:
        """The item's tokens without EOS."""
        ids = self.spell[item]
        return ids if self.eos_id is None else ids[:-1]

    @property
    def single_token(self) -> bool:
        """Every item one token (and EOS): ranked from one decoder step. Computed once (asked per batch)."""
        return self._single

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        if self.eos_id is None:
            return self.children.get(prefix, [])
        return self.children.get(prefix, [self.eos_id] if prefix in self.leaf else [])

    def finishes(self, prefix: tuple[int, ...], token: int) -> str | None:
        """The item that ``prefix + (token,)`` completes, or None."""
        if self.eos_id is None:
            return self.leaf.get(prefix + (token,))
        return self.leaf[prefix + (token,)] if token == self.eos_id else None

    def item_of(self, ids: Sequence[int]) -> str | None:
        ids = tuple(int(i) for i in ids)
        if ids in self.leaf:
            return self.leaf[ids]
        return self.leaf.get(ids + (self.eos_id,))

    def first_tokens(self) -> dict[int, str]:
        """For a single-token trie: token id -> item."""
        return {ids[0]: item for item, ids in self.spell.items()}

    def token_table(self) -> tuple[torch.Tensor, list[str], dict[str, int]]:
        """For a single-token trie: (token ids [n], items [n], item -> column), built once per trie."""
        if self._table is None:
            items = list(self.spell)
            ids = torch.tensor([self.spell[i][0] for i in items], dtype=torch.long)
            self._table = (ids, items, {it: c for c, it in enumerate(items)})
        return self._table


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


def token_logprobs(model, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log P(token) from ``logits`` [R, V] for ``tokens`` [R, W], normalised as the model was trained.

    A model trained with ``config.item_token_range`` (p5rec.train.model.P5T5ForConditionalGeneration) learnt item
    tokens under a softmax over item tokens only; those are normalised over the item tokens here too, and every
    other token (EOS, words) over the whole vocabulary. Without the range: the whole vocabulary.
    """
    logits = logits.float()
    picked = logits.gather(1, tokens)
    span = getattr(model.config, "item_token_range", None)
    if not span:
        return picked - torch.logsumexp(logits, dim=-1, keepdim=True)
    lo, hi = int(span[0]), int(span[1])
    is_item = (tokens >= lo) & (tokens < hi)
    # each normaliser only over the rows that need it: ranking asks for item tokens only, text for words mostly
    return picked - torch.where(is_item, _row_logsumexp(logits[:, lo:hi], is_item.any(1)),
                                _row_logsumexp(logits, ~is_item.all(1)))


def _row_logsumexp(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension for the selected ``rows`` [R] of ``logits`` [R, V], [R, 1]; the other
    rows get 0 (the caller reads none of them)."""
    if bool(rows.all()):
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    out = logits.new_zeros((len(logits), 1))
    if bool(rows.any()):
        out[rows] = torch.logsumexp(logits[rows], dim=-1, keepdim=True)
    return out


def _cache(cache) -> dict:
    """The decoder cache as the keyword this transformers' T5 takes it by (``model.CACHE_ARG``)."""
    from p5rec.train.model import CACHE_ARG

    return {CACHE_ARG: cache}


@torch.no_grad()
def first_step_logits(model, enc) -> torch.Tensor:
    """Logits of the first decoded token, [batch, vocab] (normalise with :func:`token_logprobs`)."""
    start = torch.full((enc["input_ids"].shape[0], 1), model.config.decoder_start_token_id, device=model.device)
    return _last_logits(model, enc, start, torch.zeros(len(start), dtype=torch.long, device=model.device))


def _last_logits(model, enc, decoder_input_ids: torch.Tensor, last: torch.Tensor,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at position ``last[b]`` of each row's decoder input, [batch, vocab], without computing the
    vocabulary projection at the other positions (right-padded rows are exact: the decoder is causal).
    ``hidden``: the encoder's output for ``enc`` when the caller has it already."""
    if hidden is None:
        hidden = model.get_encoder()(**enc).last_hidden_state
    out = model.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=hidden,
                              encoder_attention_mask=enc["attention_mask"], use_cache=False).last_hidden_state
    return _project(model, out[torch.arange(len(out), device=out.device), last])


def _project(model, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of decoder states [..., d] (scaled as T5's lm head expects), float."""
    if getattr(model.config, "scale_decoder_outputs", True):
        hidden = hidden * (model.config.d_model**-0.5)
    return model.lm_head(hidden).float()


def _labelled_sums(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its labels (-100: none) from decoder states [rows, width, d],
    projecting onto the vocabulary only where a label is (:func:`token_logprobs`' normalisation), [rows]."""
    where = labels != -100
    tok = token_logprobs(model, _project(model, hidden[where]), labels[where].unsqueeze(1)).squeeze(1)
    return torch.zeros(len(labels), device=hidden.device).index_add_(0, where.nonzero()[:, 0], tok)


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
        if all(t.single_token for t in tries):
            excl = None if exclude is None else [exclude[i] for i in idx]
            for i, ranked in zip(idx, _top_single(model, first_step_logits(model, enc), tries, k, excl)):
                results[i] = ranked
            continue
        if exclude is not None:
            tries = [_without(t, exclude[i]) for t, i in zip(tries, idx)]
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


def _top_single(model, logits: torch.Tensor, tries: Sequence[ItemTrie], k: int,
                exclude: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
    """Top-``k`` of each row's single-token trie from one step's logits [rows, vocab], with log-probabilities.

    Rows that share a trie are ranked in one ``topk``; ``exclude`` (items per row) is masked out.
    """
    out: list[list[tuple[str, float]]] = [[] for _ in tries]
    groups: dict[int, tuple[ItemTrie, list[int]]] = {}
    for row, t in enumerate(tries):
        groups.setdefault(id(t), (t, []))[1].append(row)
    for t, rows in groups.values():
        ids, items, column = t.token_table()
        if not items:
            continue
        ids = ids.to(logits.device)
        logp = token_logprobs(model, logits[rows], ids.expand(len(rows), -1))
        if exclude is not None:
            r_idx, c_idx = [], []
            for pos, r in enumerate(rows):
                cols = [column[it] for it in exclude[r] if it in column]
                r_idx += [pos] * len(cols)
                c_idx += cols
            if c_idx:
                logp[torch.tensor(r_idx), torch.tensor(c_idx)] = float("-inf")
        vals, pos = torch.topk(logp, min(k, len(items)), dim=1)
        for r, v_row, p_row in zip(rows, vals.tolist(), pos.tolist()):
            out[r] = [(items[p], v) for v, p in zip(v_row, p_row) if v != float("-inf")]
    return out


@torch.no_grad()
def _rank_by_loglik(model, enc, tries: Sequence[ItemTrie], k: int) -> list[list[tuple[str, float]]]:
    """Top-``k`` items of each prompt's trie by log P(item spelling, EOS | prompt), computed exactly."""
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
        score = _sequence_logprob(model, hidden[row : row + 1].expand(n, -1, -1),
                                  enc["attention_mask"][row : row + 1].expand(n, -1), labels)
        top = torch.topk(score, min(k, n))
        out.append([(items[int(i)], float(v)) for v, i in zip(top.values, top.indices)])
    return out


def _sequence_logprob(model, encoder_outputs, attention_mask, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log P(labels | prompt) per row, [rows]; -100 labels are padding. ``encoder_outputs``: the
    encoder's states [rows, length, d], or its output (whose first element they are)."""
    hidden = encoder_outputs if isinstance(encoder_outputs, torch.Tensor) else encoder_outputs[0]
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    out = model.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=hidden,
                              encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state
    return _labelled_sums(model, out, labels)


@torch.no_grad()
def trie_beam_search(model, enc, tries: Sequence[ItemTrie], beams: int,
                     prefix: torch.Tensor | None = None) -> list[list[tuple[str, float]]]:
    """Beam search that only walks each prompt's item trie; items with their log P(spelling [+ EOS] | prompt).

    Scores are exact sums of log-probabilities normalised as the model was trained (:func:`token_logprobs`;
    the full vocabulary for a stock T5, as ``generate`` with ``length_penalty=0``), but the beam bookkeeping
    only touches each beam's few allowed children instead of the whole vocabulary, the encoder and the
    cross-attention keys run once per prompt (not once per beam), the vocabulary projection runs at the last
    position only, and the decoder keeps its cache. ``beams`` unfinished hypotheses are kept per prompt at
    every step; finished items are collected and returned best first. With ``beams`` >= the number of items
    the search is exhaustive.

    ``prefix`` [prompts, P] (token ids, the same length for every prompt) is decoded first, after the start
    token: the continuation protocol's history; the tries then spell items without EOS (``ItemTrie.bare``).
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    device = model.device
    n_prompts, neg_inf = len(tries), float("-inf")
    hidden = model.get_encoder()(**enc).last_hidden_state
    enc_h, enc_mask = hidden, enc["attention_mask"]
    rows: list[tuple[int, tuple[int, ...]] | None] = [(b, ()) for b in range(n_prompts)]  # (prompt, prefix)
    scores = torch.zeros(n_prompts, device=device)
    tokens = torch.full((n_prompts, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    if prefix is not None and prefix.shape[1]:
        tokens = torch.cat([tokens, prefix.to(device)], dim=1)
    # no config: DynamicCache(config=) sizes itself by num_layers, the *encoder* depth, and a decoder deeper than
    # its encoder (the Beauty recipe: 1 + 2 layers) then fails at its second layer; unsized, it grows per layer
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    decoder = model.get_decoder()
    finished: list[list[tuple[str, float]]] = [[] for _ in tries]
    depth = max((len(s) for t in tries for s in t.spell.values()), default=0)
    for step in range(depth):
        out = decoder(input_ids=tokens, encoder_hidden_states=enc_h, encoder_attention_mask=enc_mask,
                      use_cache=True, **_cache(cache))
        logits = _project(model, out.last_hidden_state[:, -1])
        allowed = [tries[r[0]].allowed(r[1]) if r is not None else [] for r in rows]
        lens = np.fromiter((len(a) for a in allowed), dtype=np.int64, count=len(allowed))
        width = int(lens.max()) if len(lens) else 0
        if width == 0:
            break
        valid = np.arange(width)[None, :] < lens[:, None]
        ids = np.zeros((len(rows), width), dtype=np.int64)
        ids[valid] = [x for a in allowed for x in a]
        cand = scores[:, None] + token_logprobs(model, logits, torch.from_numpy(ids).to(device))
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
                item = trie.finishes(rows[r][1], tok)
                if item is not None:
                    finished[b].append((item, v))
                    continue
                new_rows.append((b, rows[r][1] + (tok,)))
                src.append(r)
                new_tok.append(tok)
                new_scores.append(v)
                kept += 1
            for _ in range(beams - kept):  # empty slots keep the layout rectangular
                new_rows.append(None)
                src.append(b * per)
                new_tok.append(model.config.pad_token_id or 0)
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


@torch.no_grad()
def continue_items(
    model,
    tokenizer,
    sources: Sequence[str],
    histories: Sequence[Sequence[str]],
    trie: ItemTrie,
    k: int = 20,
    batch_size: int = 64,
    num_beams: int | None = None,
    exclude: Sequence[Sequence[str]] | None = None,
    max_items: int = 49,
    max_source_length: int = 256,
    desc: str | None = None,
) -> list[list[tuple[str, float]]]:
    """Top-``k`` next items per prompt by continuing the decoder from the history: the continuation protocol.

    The decoder reads the start token and then the spellings (no EOS) of the ``max_items`` most recent items of
    each history, as a ``sequence`` template taught it to write them; the catalogue is ranked at the next
    position. Single-token ids: one decoder pass, right-padded (exact: the decoder is causal), the top-k of the
    item logits at each row's last position. Multi-token ids: :func:`trie_beam_search` from the history over
    the EOS-free trie, in batches of equal history length. ``max_items`` should be the training
    ``max_sequence`` minus one, so the ranked position is the last one a training sequence had.
    ``exclude`` removes items (e.g. the history) from each prompt's answers. Unknown history items raise
    ``KeyError``.
    """
    model.eval()
    bare = trie.bare()
    device = model.device
    prefixes = []
    for h in histories:
        h = list(h)[-max_items:] if max_items else list(h)
        try:
            prefixes.append([t for item in h for t in bare.spell[item]])
        except KeyError as e:
            raise KeyError(f"history item {e.args[0]!r} is not in the catalogue") from None
    order = np.lexsort(([len(s) for s in sources], [len(p) for p in prefixes]))
    single = bare.single_token
    results: list[list[tuple[str, float]]] = [[] for _ in sources]
    chunks, start = [], 0
    while start < len(order):  # batches; with multi-token ids every batch has one prefix length
        end = min(start + batch_size, len(order))
        if not single:
            n0 = len(prefixes[order[start]])
            while end > start + 1 and len(prefixes[order[end - 1]]) != n0:
                end -= 1
        chunks.append(order[start:end])
        start = end
    tty = sys.stderr.isatty()
    for idx in tqdm(chunks, desc=desc, disable=desc is None, leave=tty, mininterval=0.5 if tty else 30):
        enc = _encode(tokenizer, [sources[i] for i in idx], max_source_length, device)
        lens = [len(prefixes[i]) for i in idx]
        dec = torch.full((len(idx), 1 + max(lens)), model.config.decoder_start_token_id, dtype=torch.long)
        for r, i in enumerate(idx):
            dec[r, 1 : 1 + lens[r]] = torch.tensor(prefixes[i], dtype=torch.long)
        if single:
            logits = _last_logits(model, enc, dec.to(device), torch.tensor(lens, device=device))
            ranked = _top_single(model, logits, [bare] * len(idx), k,
                                 None if exclude is None else [exclude[i] for i in idx])
        else:
            tries = [bare if exclude is None else _without(bare, exclude[i]) for i in idx]
            beams = min(num_beams or k, len(bare.spell))
            ranked = [r[:k] for r in trie_beam_search(model, enc, tries, beams, prefix=dec[:, 1:])]
        for i, r in zip(idx, ranked):
            results[i] = r
    return results


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

    Full-sequence log-likelihood by teacher forcing, so multi-token answers ("dislike") are scored properly. Each
    prompt is encoded once and its decoder run over every answer together; the answers share their prefixes (the
    first position always: "yes" and "no" both begin there), so each distinct prefix's next-token distribution is
    projected onto the vocabulary and normalised once per prompt, not once per answer.
    """
    model.eval()
    device = model.device
    choice_ids = [tokenizer(c).input_ids for c in choices]  # with EOS
    width = max(len(c) for c in choice_ids)
    start = model.config.decoder_start_token_id
    dec_in = torch.full((len(choices), width), start, dtype=torch.long)
    number: dict[tuple[int, ...], int] = {}  # each distinct prefix of an answer -> its row
    reads: list[tuple[int, int]] = []  # per prefix: the (answer, position) whose decoder state predicts after it
    follows: list[list[int]] = []  # per prefix: the distinct tokens the answers put after it
    edges = []  # per answer and position: (answer, prefix, column of its token among the prefix's followers)
    for j, ids in enumerate(choice_ids):
        dec_in[j, 1 : len(ids)] = torch.tensor(ids[:-1])
        for i, tok in enumerate(ids):
            k = number.setdefault(tuple(ids[:i]), len(number))
            if k == len(reads):
                reads.append((j, i))
                follows.append([])
            if tok not in follows[k]:
                follows[k].append(tok)
            edges.append((j, k, follows[k].index(tok)))
    n_pre, n_next = len(reads), max(map(len, follows))
    nxt_tokens = torch.zeros((n_pre, n_next), dtype=torch.long)
    for k, toks in enumerate(follows):
        nxt_tokens[k, : len(toks)] = torch.tensor(toks)
    answer_of, pos_of = (torch.tensor(v, device=device) for v in zip(*reads))
    # [n_pre * n_next, answers]: which (prefix, next token) log-probabilities each answer sums
    incidence = torch.zeros((n_pre * n_next, len(choices)), device=device)
    for j, p, c in edges:
        incidence[p * n_next + c, j] = 1.0
    dec_in, nxt_tokens = dec_in.to(device), nxt_tokens.to(device)
    out = np.zeros((len(sources), len(choices)), dtype=np.float64)
    for idx, texts in _batches(sources, batch_size, desc):
        enc = _encode(tokenizer, texts, max_source_length, device)
        hidden = model.get_encoder()(**enc).last_hidden_state
        n, answers = len(idx), len(choices)
        states = model.get_decoder()(
            input_ids=dec_in.repeat(n, 1), encoder_hidden_states=hidden.repeat_interleave(answers, 0),
            encoder_attention_mask=enc["attention_mask"].repeat_interleave(answers, 0), use_cache=False,
        ).last_hidden_state.view(n, answers, width, -1)
        logits = _project(model, states[:, answer_of, pos_of]).view(n * n_pre, -1)  # the causal decoder: a
        # prefix's state is the same in every answer that begins with it
        lp = token_logprobs(model, logits, nxt_tokens.repeat(n, 1)).view(n, n_pre * n_next)
        out[idx] = (lp @ incidence).cpu().numpy()
    return out


@torch.no_grad()
def candidate_logprobs(
    model,
    tokenizer,
    sources: Sequence[str],
    candidates: Sequence[Sequence[str]],
    batch_size: int = 64,
    max_source_length: int = 256,
    max_target_length: int = 64,
    pair_batch: int = 512,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Teacher-forced log P(c | source) for each source and each of its own candidate texts ``c``.

    Returns, per source, (summed log-probabilities with EOS, normalised as the model was trained; token counts),
    each [len(candidates[i])]. Each prompt is encoded once and each distinct candidate tokenized once; a prompt's
    candidates are decoded together (``pair_batch`` (prompt, candidate) rows at a time, sorted by length), and the
    vocabulary projection is computed only where a candidate token is.
    """
    model.eval()
    texts = list(dict.fromkeys(c for cs in candidates for c in cs))
    ids = tokenizer(texts, truncation=True, max_length=max_target_length).input_ids if texts else []
    lens = np.array([len(t) for t in ids], dtype=np.int64)
    table = np.full((len(ids), int(lens.max(initial=1))), -100, dtype=np.int64)
    for k, seq in enumerate(ids):  # once per distinct candidate
        table[k, : len(seq)] = seq
    number = {t: k for k, t in enumerate(texts)}
    which = np.array([number[c] for cs in candidates for c in cs], dtype=np.int64)  # flat pair -> text
    offsets = np.cumsum([0] + [len(cs) for cs in candidates])
    logp = np.zeros(len(which))
    start = model.config.decoder_start_token_id
    for idx, texts_b in _batches(sources, batch_size, None):
        enc = _encode(tokenizer, texts_b, max_source_length, model.device)
        hidden = model.get_encoder()(**enc).last_hidden_state
        flat = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])  # this batch's pairs
        row = np.repeat(np.arange(len(idx)), [offsets[i + 1] - offsets[i] for i in idx])
        order = np.argsort(lens[which[flat]], kind="stable")
        flat, row = flat[order], row[order]
        for lo in range(0, len(flat), pair_batch):
            f, r = flat[lo : lo + pair_batch], torch.as_tensor(row[lo : lo + pair_batch], device=model.device)
            width = int(lens[which[f]].max())
            labels = torch.as_tensor(table[which[f], :width], device=model.device)
            dec_in = torch.cat([torch.full((len(f), 1), start, device=model.device), labels[:, :-1].clamp(min=0)], 1)
            h = model.get_decoder()(input_ids=dec_in, encoder_hidden_states=hidden[r],
                                    encoder_attention_mask=enc["attention_mask"][r], use_cache=False).last_hidden_state
            logp[f] = _labelled_sums(model, h, labels).cpu().numpy()
    count = lens[which]
    return [(logp[offsets[i] : offsets[i + 1]], count[offsets[i] : offsets[i + 1]]) for i in range(len(candidates))]


def choose_texts(model, tokenizer, sources: Sequence[str], candidates: Sequence[Sequence[str]],
                 length_penalty: float = 1.0, **kw) -> list[str]:
    """For each prompt, the one of its own candidate texts with the highest ``log P(text | prompt) / tokens **
    length_penalty`` (:func:`candidate_logprobs`; 0: the likeliest text, 1: the likeliest per token, more: longer
    texts favoured); "" for a prompt without candidates. Ties go to the earlier candidate."""
    scored = candidate_logprobs(model, tokenizer, sources, candidates, **kw)
    return [c[int(np.argmax(lp / np.maximum(n, 1) ** length_penalty))] if len(c) else ""
            for c, (lp, n) in zip(candidates, scored)]


@torch.no_grad()
def target_logprobs(
    model,
    tokenizer,
    sources: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    max_source_length: int = 256,
    max_target_length: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced log P(target | source) per pair (summed over the target's tokens, EOS included, normalised
    as the model was trained) and the number of target tokens, both [n]."""
    model.eval()
    logp = np.zeros(len(sources), dtype=np.float64)
    count = np.zeros(len(sources), dtype=np.int64)
    for idx, texts in _batches(sources, batch_size, None):
        enc = _encode(tokenizer, texts, max_source_length, model.device)
        labels = tokenizer(text_target=[targets[i] for i in idx], return_tensors="pt", padding=True,
                           truncation=True, max_length=max_target_length).input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        labels = labels.to(model.device)
        encoder_out = model.get_encoder()(**enc)
        logp[idx] = _sequence_logprob(model, encoder_out, enc["attention_mask"], labels).cpu().numpy()
        count[idx] = (labels != -100).sum(-1).cpu().numpy()
    return logp, count


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
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    contrast: float = 0.0,
    contrast_sources: Sequence[str] | None = None,
    plausibility: float = 0.0,
) -> list[str]:
    """Greedy (or beam) decoding of free text, one string per prompt.

    ``no_repeat_ngram_size`` (n > 0: no n-gram of output tokens twice) and ``repetition_penalty`` (CTRL's
    division of a seen token's logit) are ``generate``'s own; they stop the loops a small model falls into
    ("it't, but it't, but it't").

    ``contrast`` > 0 decodes against ``contrast_sources`` (one per prompt: another case's prompt of the same
    template), scoring each next token by :class:`PromptContrast`: what the case's own prompt says over what any
    prompt of the template says, so a model that has learnt a stock answer is pushed towards the words its own
    case makes likelier. ``plausibility`` keeps only tokens within that factor of the best one under the own prompt.
    """
    model.eval()
    results = [""] * len(sources)
    extra = {}
    if no_repeat_ngram_size:
        extra["no_repeat_ngram_size"] = int(no_repeat_ngram_size)
    if repetition_penalty != 1.0:
        extra["repetition_penalty"] = float(repetition_penalty)
    if contrast and (contrast_sources is None or len(contrast_sources) != len(sources)):
        raise ValueError("contrast > 0 needs one contrast source per prompt")
    from transformers import LogitsProcessorList
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    for idx, texts in _batches(sources, batch_size, desc):
        enc = _encode(tokenizer, texts, max_source_length, model.device)
        if contrast:
            other = _encode(tokenizer, [contrast_sources[i] for i in idx], max_source_length, model.device)
            extra["logits_processor"] = LogitsProcessorList(
                [PromptContrast(model, other, contrast, num_beams, plausibility)])
        # generate() would size its cache by num_layers, the encoder's depth (see trie_beam_search)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                             **_cache(cache), **extra)
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            results[i] = text.strip()
    return results


class PromptContrast:
    """Context-aware decoding (Shi et al., NAACL 2024, "Trusting Your Evidence"), as a ``generate`` logits processor.

    Each next token is scored ``(1 + a) log p(y | own prompt) - a log p(y | other prompt)``, where the other prompt
    is another case's prompt of the same template: the template's words are the same, only the user, item, hint or
    review differ. A token the template alone makes likely (the stock answer a small multitask model falls back
    to) gains nothing; one that the case's own prompt makes likelier than another case's gains ``a`` times that
    difference. ``plausibility`` b > 0 (Li et al. 2023) first drops tokens whose own-prompt probability is under
    b times the best token's, so the contrast cannot promote a token the model itself finds implausible.

    The other prompt's decoder keeps its own cache. ``generate`` does not tell a processor which beam each new row
    extends, so it is read off the rows: a new row's prefix (all but its last token) is the whole of the row it
    extends, found among the same prompt's rows of the step before; the cache is reordered by those parents and only
    the new token runs through the decoder. Beam search hands the processor log-probabilities and greedy search raw
    logits; both are normalised first.
    """

    def __init__(self, model, other_enc: dict, contrast: float, num_beams: int, plausibility: float = 0.0):
        self.model, self.contrast, self.plausibility = model, float(contrast), float(plausibility)
        self.num_beams = num_beams
        with torch.no_grad():
            hidden = model.get_encoder()(**other_enc).last_hidden_state
        self.hidden = hidden.repeat_interleave(num_beams, dim=0)
        self.mask = other_enc["attention_mask"].repeat_interleave(num_beams, dim=0)
        self.cache, self.rows = None, None  # the decoder cache and the rows it holds

    def _parents(self, input_ids: torch.Tensor) -> torch.Tensor:
        """For each row, the row of the step before that it extends (within its prompt's ``num_beams`` rows)."""
        rows, n = input_ids.shape[0], self.num_beams
        prefix = input_ids[:, :-1].view(rows // n, n, 1, -1)
        before = self.rows.view(rows // n, 1, n, -1)
        same = (prefix == before).all(-1)  # [prompts, new row, old row]
        if not bool(same.any(-1).all()):
            raise RuntimeError("PromptContrast: a beam extends no row of the step before")
        return (same.float().argmax(-1) + torch.arange(0, rows, n, device=input_ids.device)[:, None]).view(-1)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        # beam search passes log-probabilities; greedy passes logits, whose per-row shift changes no choice below
        own = scores.float()
        if self.cache is None or self.rows is None or self.rows.shape[1] != input_ids.shape[1] - 1:
            # the first step (or a call out of sequence): the whole prefix, a fresh cache
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            step = input_ids
        else:
            self.cache.self_attention_cache.reorder_cache(self._parents(input_ids))
            step = input_ids[:, -1:]
        out = self.model.get_decoder()(input_ids=step, encoder_hidden_states=self.hidden,
                                       encoder_attention_mask=self.mask, use_cache=True, **_cache(self.cache))
        self.rows = input_ids
        other = torch.log_softmax(_project(self.model, out.last_hidden_state[:, -1]), dim=-1)
        mixed = torch.sub(own, other).mul_(self.contrast).add_(own)  # (1 + a) own - a other, in place
        if self.plausibility > 0:  # a -inf (banned) token is under any finite floor
            floor = own.max(dim=-1, keepdim=True).values + float(np.log(self.plausibility))
            return mixed.masked_fill_(own < floor, float("-inf")).to(scores.dtype)
        return mixed.masked_fill_(torch.isneginf(own), float("-inf")).to(scores.dtype)


def derangement(n: int, seed: int | np.random.Generator) -> np.ndarray:
    """A seeded permutation with no fixed point (for n >= 2): case ``i`` is paired with case ``out[i]``."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty_like(order)
    out[order] = np.roll(order, -1)  # case order[j] gets case order[j + 1]
    return out
