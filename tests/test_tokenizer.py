import pytest
from transformers import AutoTokenizer

from p5rec.prompts.tokenizer import build_tokenizer, train_sentencepiece

CORPUS = [
    "great guitar strings, they sound bright and stay in tune",
    "the cable is cheap but the plugs feel solid",
    "user 17 bought item 1234 and item 56",
    "this pedal adds a warm tone to my amp",
] * 30


def test_sentencepiece_splits_digits_and_is_deterministic():
    v1 = train_sentencepiece(CORPUS, vocab_size=120, seed=1)
    v2 = train_sentencepiece(CORPUS, vocab_size=120, seed=1)
    assert v1 == v2
    pieces = {p for p, _ in v1}
    assert {"<pad>", "</s>", "<unk>"} <= pieces
    assert [p for p, _ in v1[:3]] == ["<pad>", "</s>", "<unk>"]
    # split_digits: no piece holds two digits
    assert not any(sum(c.isdigit() for c in p) > 1 for p in pieces)


def test_id_tokens_are_single_tokens_and_survive_reload(tmp_path):
    vocab = train_sentencepiece(CORPUS, vocab_size=120)
    ids = ["<u17>", "<i5>", "<i9>", "<a3>", "<b12>"]
    tok = build_tokenizer(vocab, ids)
    for t in ids:  # each id encodes to exactly one token (a silent split would ruin decoding)
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    enc = tok("<u17> bought <i5><i9>", add_special_tokens=False).input_ids
    toks = tok.convert_ids_to_tokens(enc)
    assert toks[0] == "<u17>" and toks[-2:] == ["<i5>", "<i9>"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in CORPUS[:4] + ["<u17> bought <i5><i9>"]:
        assert again(s).input_ids == tok(s).input_ids
    assert tok("great").input_ids[-1] == tok.eos_token_id


def test_text_ids_split_into_digits():
    tok = build_tokenizer(train_sentencepiece(CORPUS, vocab_size=120))
    toks = tok.convert_ids_to_tokens(tok("item_1234", add_special_tokens=False).input_ids)
    assert toks[-4:] == ["1", "2", "3", "4"]


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", "  "])


def test_mixture_tokenize_cuts_long_rows_like_the_tokenizer_and_says_so(caplog):
    from datasets import Dataset

    from p5rec.prompts.mixture import MixtureSpec, tokenize

    tok = build_tokenizer(train_sentencepiece(CORPUS, vocab_size=120))
    ds = Dataset.from_dict({"source": ["great guitar strings " * 20, "cheap cable"], "target": ["5", "the plugs " * 20]})
    spec = MixtureSpec(max_source_length=16, max_target_length=8)
    with caplog.at_level("WARNING", logger="p5rec.prompts.mixture"):
        out = tokenize(ds, tok, spec, "tokenizing test")
    ref = tok(list(ds["source"]), truncation=True, max_length=16)["input_ids"]
    assert out["input_ids"] == ref and len(out["input_ids"][0]) == 16 and out["input_ids"][0][-1] == tok.eos_token_id
    assert [len(x) for x in out["attention_mask"]] == [len(x) for x in ref]
    assert out["labels"] == tok(text_target=list(ds["target"]), truncation=True, max_length=8)["input_ids"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("1 of 2 sources were longer than 16 tokens" in m for m in msgs)
    assert any("1 of 2 targets were longer than 8 tokens" in m for m in msgs)


def test_a_corpus_of_few_words_keeps_every_word_whole():
    # prompts over ids without review text (Beauty's): the unigram trainer kept ~40 pieces here and spelt
    # "interacted" as fragments, "a" and "user" as unknown pieces
    prompts = ["List the items a user interacted with, oldest first. <i12><i7>",
               "What has <u3> bought so far, in order? <i5>",
               "Given the purchase history <i1><i2>, predict the next item."] * 2000
    vocab = train_sentencepiece(prompts, vocab_size=4000)
    tok = build_tokenizer(vocab, ["<u3>", "<i1>", "<i2>", "<i5>", "<i7>", "<i12>"])
    pieces = tok.convert_ids_to_tokens(tok(prompts[0], add_special_tokens=False).input_ids)
    assert pieces == ["\u2581" + w for w in "List the items a user interacted with, oldest first.".split()] + [
        "<i12>", "<i7>"]
    pieces = tok.convert_ids_to_tokens(tok(prompts[2], add_special_tokens=False).input_ids)
    assert pieces == ["\u2581Given", "\u2581the", "\u2581purchase", "\u2581history", "<i1>", "<i2>", "\u2581,",
                      "\u2581predict", "\u2581the", "\u2581next", "\u2581item."]
    for p in prompts[:3]:
        assert tok.decode(tok(p).input_ids, skip_special_tokens=True).replace(" ", "") == p.replace(" ", "")
    # a word the corpus never had is spelt in characters, digits one by one
    out = tok.convert_ids_to_tokens(tok("oldest items 42 tide", add_special_tokens=False).input_ids)
    assert out == ["\u2581oldest", "\u2581items", "\u25814", "2", "\u2581t", "i", "d", "e"]
    assert tok.unk_token_id not in tok("the items", add_special_tokens=False).input_ids


def test_a_corpus_of_many_words_still_trains_sentencepiece():
    many = [" ".join(f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(j, j + 8))
            for j in range(0, 3000, 3)]
    vocab = train_sentencepiece(many, vocab_size=300)
    assert len(vocab) <= 300  # the trained model, not one piece per word (there are 3,000 words)


def test_the_whole_word_vocabulary_is_taken_exactly_when_it_fits():
    """word_vocabulary stops counting once the words alone cannot fit: never earlier than the full count would
    say so (pad/eos/unk, the words, each character alone and after ▁, ▁ itself)."""
    from p5rec.prompts.tokenizer import word_vocabulary

    words = [f"w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(200)]  # 200 words over 27 characters
    corpus = [" ".join(words[j : j + 5]) for j in range(0, 200, 5)]
    chars = set("".join(words)) | set("0123456789")
    fits = 3 + len(words) + 2 * len(chars) + 1
    vocab = word_vocabulary(corpus, fits)
    assert vocab is not None and len(vocab) == fits
    assert {"\u2581" + w for w in words} <= {p for p, _ in vocab}
    assert word_vocabulary(corpus, fits - 1) is None
    assert word_vocabulary(corpus * 50, len(words)) is None  # more words than fit: given up early
