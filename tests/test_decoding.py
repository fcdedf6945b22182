"""Decoding: restricted ranking never leaves the catalogue; an oracle model ranks the truth first."""

import numpy as np
import pytest
import torch

from p5rec.eval import metrics
from p5rec.eval.decoding import ItemTrie, choice_logprobs, generate_text, rank_items
from p5rec.train.model import build_model
from p5rec.prompts.tokenizer import build_tokenizer, train_sentencepiece

WORDS = ["find the item", "recommend", "yes", "no", "next one please", "good strings"] * 20


def _setup(surfaces: dict[str, str], **shape):
    torch.manual_seed(0)
    ids = sorted({t for s in surfaces.values() for t in s.replace("><", "> <").split()})
    tok = build_tokenizer(train_sentencepiece(WORDS, vocab_size=60), ids)
    model = build_model("tiny", tok, **shape)
    return tok, model


def _train_copy(model, tok, surfaces, max_steps=600):
    """Teach the tiny model to answer "find X" with X, until greedy decoding gets every case right (an oracle)."""
    src = [f"find {s}" for s in surfaces.values()]
    tgt = list(surfaces.values())
    enc = tok(src, return_tensors="pt", padding=True)
    lab = tok(text_target=tgt, return_tensors="pt", padding=True).input_ids
    lab[lab == tok.pad_token_id] = -100
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(max_steps):
        loss = model(**enc, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 99 and generate_text(model, tok, src, max_new_tokens=4) == [
            tok.decode(tok(t).input_ids, skip_special_tokens=True) for t in tgt
        ]:
            break
        model.train()
    model.eval()
    assert generate_text(model, tok, src, max_new_tokens=4) == [
        tok.decode(tok(t).input_ids, skip_special_tokens=True) for t in tgt
    ], "the oracle did not learn its copy task"
    return src


SINGLE = {f"raw{i}": f"<i{i}>" for i in range(1, 13)}
MULTI = {f"raw{a}{b}": f"<a{a}><b{b}>" for a in range(3) for b in range(4)}


@pytest.mark.parametrize("surfaces", [SINGLE, MULTI], ids=["single-token", "collaborative"])
def test_untrained_model_only_yields_catalogue_items(surfaces):
    tok, model = _setup(surfaces)
    trie = ItemTrie.from_surfaces(tok, surfaces)
    assert trie.single_token == (surfaces is SINGLE)
    ranked = rank_items(model, tok, ["recommend", "next one please", "good strings"], trie, k=10, num_beams=10)
    for r in ranked:
        items = [i for i, _ in r]
        assert len(items) == 10 and len(set(items)) == 10
        assert set(items) <= set(surfaces)
        scores = [s for _, s in r]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("surfaces", [SINGLE, MULTI], ids=["single-token", "collaborative"])
def test_oracle_model_scores_perfectly(surfaces):
    tok, model = _setup(surfaces)
    src = _train_copy(model, tok, surfaces)
    trie = ItemTrie.from_surfaces(tok, surfaces)
    ranked = rank_items(model, tok, src, trie, k=5, num_beams=5)
    m = metrics.ranking_metrics([[i for i, _ in r] for r in ranked], list(surfaces))
    assert m["HR@1"] == 1.0 and m["NDCG@5"] == 1.0
    # a wide beam (finished beams get padded with EOS) still returns k distinct catalogue items
    ranked = rank_items(model, tok, src, trie, k=10, num_beams=12)
    assert all(len(r) == 10 and len({i for i, _ in r}) == 10 for r in ranked)
    # restricted to per-prompt candidates (a different set for every prompt, as in evaluation): the full
    # candidate list comes back, ranked with the truth first
    raws = list(surfaces)
    cands = [[raws[i]] + [raws[(i + d) % len(raws)] for d in (1, 3, 5)] for i in range(len(raws))]
    per = [trie.subset(c) for c in cands]
    ranked = rank_items(model, tok, src, per, k=4, batch_size=5)
    assert [r[0][0] for r in ranked] == raws
    assert all(sorted(i for i, _ in r) == sorted(c) for r, c in zip(ranked, cands))
    ranked = rank_items(model, tok, src[:4], trie, k=3, exclude=[[t] for t in list(surfaces)[:4]])
    assert all(r[0][0] != t for r, t in zip(ranked, surfaces))


def test_trie_rejects_colliding_spellings():
    with pytest.raises(ValueError, match="tokenize identically"):
        ItemTrie({"a": (5, 1), "b": (5, 1)}, eos_id=1)


@pytest.mark.parametrize("shape", [{}, {"num_layers": 1, "num_decoder_layers": 2}],
                         ids=["preset", "decoder-deeper-than-encoder"])
def test_choice_logprobs_and_generation_shapes(shape):
    tok, model = _setup(SINGLE, **shape)
    lp = choice_logprobs(model, tok, ["recommend", "good strings", "yes"], ["yes", "no", "next one"])
    assert lp.shape == (3, 3) and np.all(lp < 0)
    # probabilities of full answers are consistent with first-token masses: P(yes)+P(no) <= 1
    assert np.all(np.exp(lp[:, 0]) + np.exp(lp[:, 1]) <= 1 + 1e-6)
    out = generate_text(model, tok, ["recommend", "good strings"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    # beams reorder and expand the cache: beam search runs on every shape too (the evaluation's text decoding)
    beam = generate_text(model, tok, ["recommend", "good strings"], max_new_tokens=4, num_beams=3,
                         no_repeat_ngram_size=2)
    assert len(beam) == 2 and all(isinstance(o, str) for o in beam)


@pytest.mark.parametrize("shape", [{}, {"num_layers": 1, "num_decoder_layers": 2}],
                         ids=["preset", "decoder-deeper-than-encoder"])
def test_trie_beam_search_is_exact_when_exhaustive(shape):
    """Beams >= items: every item comes back with log P(spelling + EOS | prompt) equal to the teacher-forced
    value, in the same order; narrower beams return true scores too. One item's spelling is a prefix of others'.
    A decoder deeper than its encoder (the Beauty recipe's shape) keeps a cache layer per decoder layer."""
    from p5rec.eval.decoding import _encode, _rank_by_loglik, trie_beam_search

    surfaces = {**MULTI, "short": "<a2>"}
    tok, model = _setup(surfaces, **shape)
    model.eval()
    trie = ItemTrie.from_surfaces(tok, surfaces)
    prompts = ["recommend", "next one please good strings", "find the item"]
    enc = _encode(tok, prompts, 64, model.device)
    exact = _rank_by_loglik(model, enc, [trie] * len(prompts), k=len(surfaces))
    full = trie_beam_search(model, enc, [trie] * len(prompts), beams=len(surfaces))
    for got, want in zip(full, exact):
        assert [i for i, _ in got] == [i for i, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
    truth = {i: s for i, s in exact[0]}
    narrow = trie_beam_search(model, enc, [trie] * len(prompts), beams=3)
    assert all(len(r) >= 3 for r in narrow)
    assert all(abs(s - truth[i]) < 1e-4 for i, s in narrow[0])


# ------------------------------------------------------------------ continuation (sequence templates)
def _pairs(raws):
    return [(x, y) for x in raws for y in raws if x != y]


def _train_alternating(model, tok, surfaces, steps=300):
    """Teach the model item sequences that alternate two items, x y x y x y (no EOS, as a ``sequence``
    template's target is written): the next item is always the one two items back, on half of the pairs."""
    pairs = _pairs(list(surfaces))[::2]
    seqs = [(surfaces[x] + surfaces[y]) * 3 for x, y in pairs]
    enc = tok(["list the items"] * len(seqs), return_tensors="pt", padding=True)
    labels = torch.tensor([tok(x, add_special_tokens=False).input_ids for x in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_continuation_oracle_ranks_the_next_item_first():
    from p5rec.eval.decoding import continue_items

    surfaces = SINGLE
    tok, model = _setup(surfaces)
    _train_alternating(model, tok, surfaces)
    # held-out pairs, histories of 2 to 4 items: reading one position off gives the wrong item
    held_out = _pairs(list(surfaces))[1::2][:16]
    histories = [[x, y, x, y][: 2 + j % 3] for j, (x, y) in enumerate(held_out)]
    truth = [h[-2] for h in histories]
    n = len(histories)
    trie = ItemTrie.from_surfaces(tok, surfaces)
    ranked = continue_items(model, tok, ["list the items"] * n, histories, trie, k=5, num_beams=5, batch_size=4)
    assert [r[0][0] for r in ranked] == truth
    assert all(len(r) == 5 and len({i for i, _ in r}) == 5 and {i for i, _ in r} <= set(surfaces) for r in ranked)
    assert all(r == sorted(r, key=lambda x: -x[1]) for r in ranked)
    # the history can be excluded; the answer is then never one of its items
    ranked = continue_items(model, tok, ["list the items"] * n, histories, trie, k=12, num_beams=12,
                            exclude=histories)
    assert all(not {i for i, _ in r} & set(h) and len(r) == 10 for r, h in zip(ranked, histories))
    with pytest.raises(KeyError, match="not in the catalogue"):
        continue_items(model, tok, ["list the items"], [["nope"]], trie)


@pytest.mark.parametrize("surfaces", [SINGLE, MULTI], ids=["single-token", "collaborative"])
def test_continuation_is_exact(surfaces):
    """Every item after every history comes back with log P(item's spelling | prompt, history) as teacher
    forcing computes it, in that order: histories of several lengths, in batches smaller than the set."""
    from p5rec.eval.decoding import _encode, _sequence_logprob, continue_items

    tok, model = _setup(surfaces)
    model.eval()
    trie = ItemTrie.from_surfaces(tok, surfaces)
    bare = trie.bare()
    raws = list(surfaces)
    histories = [raws[j : j + 1 + j % 4] for j in range(7)]
    prompts = ["recommend", "next one please good strings", "find the item", "yes"] * 2
    prompts = prompts[: len(histories)]
    got = continue_items(model, tok, prompts, histories, trie, k=len(raws), num_beams=len(raws), batch_size=3)
    with torch.no_grad():
        for prompt, history, ranked in zip(prompts, histories, got):
            enc = _encode(tok, [prompt], 64, model.device)
            hidden = (model.get_encoder()(**enc).last_hidden_state,)
            prefix = [t for item in history for t in bare.spell[item]]
            want = {}
            for item in raws:
                whole = torch.tensor([prefix + list(bare.spell[item])])
                want[item] = float(_sequence_logprob(model, hidden, enc["attention_mask"], whole)
                                   - _sequence_logprob(model, hidden, enc["attention_mask"], whole[:, : len(prefix)]))
            assert [i for i, _ in ranked] == sorted(raws, key=lambda i: -want[i])
            assert np.allclose([s for _, s in ranked], [want[i] for i, _ in ranked], atol=1e-4)


def test_bare_trie_refuses_prefix_spellings():
    with pytest.raises(ValueError, match="prefix-free"):
        ItemTrie({"a": (5,), "b": (5, 6)}, eos_id=None)


# ------------------------------------------------------------------ context-aware decoding of text
def test_prompt_contrast_scores_by_hand():
    """(1 + a) log p(y | own) - a log p(y | other), the other prompt's decoder run on the same prefix; the
    plausibility floor drops tokens under b times the best own-prompt probability."""
    from p5rec.eval.decoding import PromptContrast, _encode, _last_logits

    tok, model = _setup(SINGLE)
    model.eval()
    other = _encode(tok, ["good strings", "recommend"], 32, model.device)
    beams = 2
    proc = PromptContrast(model, other, contrast=1.5, num_beams=beams)
    start = torch.full((2 * beams, 1), model.config.decoder_start_token_id)
    scores = torch.log_softmax(torch.randn(2 * beams, model.config.vocab_size), -1)  # as beam search hands them
    scores[0, 3] = float("-inf")  # a token a processor before it banned stays banned
    got = proc(start, scores)
    other_lp = torch.log_softmax(_last_logits(model, other, start[::beams], torch.zeros(2, dtype=torch.long)), -1)
    want = 2.5 * scores - 1.5 * other_lp.repeat_interleave(beams, 0)
    assert torch.isneginf(got[0, 3]) and torch.allclose(got, want, atol=1e-5)
    floor = PromptContrast(model, other, contrast=1.5, num_beams=beams, plausibility=0.5)(start, scores)
    kept = scores >= scores.max(-1, keepdim=True).values + np.log(0.5)
    assert torch.isneginf(floor[~kept]).all() and torch.allclose(floor[kept], want[kept], atol=1e-5)
    assert kept.sum(-1).min() >= 1  # the best token always stays
    # the next step from the cache: beams reordered (row 1 extends row 0, row 3 extends row 2...), as from scratch
    second = torch.cat([start[[1, 0, 3, 2]], torch.tensor([[5], [7], [5], [9]])], dim=1)
    second[0, 0] = second[1, 0] = start[0, 0]
    got = proc(second, scores)
    full = _last_logits(model, {"attention_mask": other["attention_mask"].repeat_interleave(beams, 0)}, second,
                        torch.ones(4, dtype=torch.long), hidden=proc.hidden)
    want = 2.5 * scores - 1.5 * torch.log_softmax(full, -1)
    assert torch.allclose(got, want, atol=1e-4)
    third = torch.cat([second[[1, 0, 2, 2]], torch.tensor([[4], [4], [6], [8]])], dim=1)  # rows swap, one forks
    got = proc(third, scores)
    full = _last_logits(model, {"attention_mask": other["attention_mask"].repeat_interleave(beams, 0)}, third,
                        torch.full((4,), 2, dtype=torch.long), hidden=proc.hidden)
    assert torch.allclose(got, 2.5 * scores - 1.5 * torch.log_softmax(full, -1), atol=1e-4)


def test_contrast_with_the_own_prompt_changes_nothing_and_sharpens_an_oracle():
    """Against its own prompt the contrast is the identity; against other cases' prompts an oracle copier still
    writes each case's own answer (what the case's prompt makes likelier is what it gains)."""
    from p5rec.eval.decoding import derangement

    tok, model = _setup(SINGLE)
    src = _train_copy(model, tok, SINGLE)
    plain = generate_text(model, tok, src, max_new_tokens=4, num_beams=3)
    assert generate_text(model, tok, src, max_new_tokens=4, num_beams=3, contrast=2.0, contrast_sources=src) == plain
    other = derangement(len(src), seed=0)
    assert sorted(other) == list(range(len(src))) and all(o != i for i, o in enumerate(other))
    for beams in (1, 3):
        assert generate_text(model, tok, src, max_new_tokens=4, num_beams=beams, contrast=2.0,
                             contrast_sources=[src[i] for i in other]) == plain
    with pytest.raises(ValueError, match="one contrast source per prompt"):
        generate_text(model, tok, src, contrast=1.0, contrast_sources=src[:2])


# ------------------------------------------------------------------ text chosen among candidates
def test_candidate_scores_are_the_teacher_forced_scores_pair_by_pair():
    """Each prompt encoded once, candidates decoded in length-sorted chunks that cross prompts: the same numbers
    as scoring every (prompt, candidate) pair on its own."""
    from p5rec.eval.decoding import candidate_logprobs, target_logprobs

    tok, model = _setup(SINGLE)
    model.eval()
    sources = ["recommend", "next one please", "good strings", "find the item"]
    cands = [["yes", "no strings", "good"], [], ["next one please", "yes"], ["no"]]
    out = candidate_logprobs(model, tok, sources, cands, batch_size=3, pair_batch=2)
    pairs = [(s, c) for s, cs in zip(sources, cands) for c in cs]
    lp, n = target_logprobs(model, tok, [s for s, _ in pairs], [c for _, c in pairs])
    assert [len(o[0]) for o in out] == [3, 0, 2, 1]
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), lp, rtol=1e-5, atol=1e-5)
    assert np.concatenate([o[1] for o in out]).tolist() == n.tolist()


def test_choice_scores_share_prefixes_and_match_teacher_forcing():
    """Answers that share a first position (always) and longer prefixes ("next one please" / "next one"): each
    prefix is projected once per prompt, and every answer's score is its own teacher-forced log-probability."""
    from p5rec.eval.decoding import target_logprobs

    tok, model = _setup(SINGLE)
    model.eval()
    sources = ["recommend", "next one please", "good strings", "find the item", "yes"]
    choices = ["yes", "no", "next one please", "next one", "good strings"]
    assert tok("next one please").input_ids[:2] == tok("next one").input_ids[:2]  # a shared prefix past the start
    got = choice_logprobs(model, tok, sources, choices, batch_size=2)
    pairs = [(s, c) for s in sources for c in choices]
    want, _ = target_logprobs(model, tok, [s for s, _ in pairs], [c for _, c in pairs])
    np.testing.assert_allclose(got, want.reshape(len(sources), len(choices)), rtol=1e-5, atol=1e-5)


def test_choose_texts_follows_its_length_penalty(monkeypatch):
    from p5rec.eval import decoding

    scores = [(np.array([-4.0, -6.0]), np.array([2, 6])), (np.zeros(0), np.zeros(0, dtype=int))]
    monkeypatch.setattr(decoding, "candidate_logprobs", lambda *a, **k: scores)
    cands = [["short", "a longer one"], []]
    # 0: the likeliest text (-4 > -6); 1: the likeliest per token (-6/6 > -4/2); no candidates: ""
    assert decoding.choose_texts(None, None, ["p", "q"], cands, length_penalty=0.0) == ["short", ""]
    assert decoding.choose_texts(None, None, ["p", "q"], cands, length_penalty=1.0) == ["a longer one", ""]
