"""Offline tokenizer: a SentencePiece unigram model trained on the project's own prompts, plus one token per id.

Why this shape:
- Nothing can be downloaded, so the vocabulary is learnt from the rendered training prompts and targets.
- ``split_digits=True``: in ``text`` id form (P5's scheme, ``item_1234``) every digit is its own piece, so an id
  always splits the same way (``▁item _ 1 2 3 4``) instead of into whatever digit chunks happened to be frequent.
- In ``token`` id form (the default) each user/item id, or each level of a collaborative id, is an added token
  (``<u17>``, ``<i532>``, ``<a3><b0><c12>``): the target of a next-item prompt is one token, which is what lets a
  small T5 trained from scratch on a CPU learn anything (Beauty sequences, 15 min, 1.9 M T5: test HR@10 .0125 with
  one token per item, .0035 with P5's digit ids, popularity .0140).

transformers 5.x pitfalls avoided here: ``T5Tokenizer(vocab_file=...)`` silently ignores the file, and a directory
holding only ``spiece.model`` does not load through ``AutoTokenizer``. We build the unigram tokenizer from the
(piece, score) list, wrap its backend in ``PreTrainedTokenizerFast`` and ``save_pretrained`` it, so
``AutoTokenizer.from_pretrained(dir)`` reloads it with neither sentencepiece nor protobuf.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Added id tokens, e.g. <u17>, <i532>, <a3>: stripped from the SentencePiece training corpus (they are added whole).
ID_TOKEN_RE = re.compile(r"<[a-z]\d+>")


def train_sentencepiece(
    lines: Iterable[str], vocab_size: int = 8000, seed: int = 42, max_sentences: int = 2_000_000
) -> list[tuple[str, float]]:
    """Train a unigram SentencePiece model on ``lines``; return its (piece, score) vocabulary.

    Ids 0/1/2 are pad/eos/unk, as T5 expects. ``hard_vocab_limit=False`` lets a small corpus yield a smaller
    vocabulary instead of failing. Deterministic for the same lines (single thread, fixed seed, no sampling
    of the input beyond ``max_sentences`` taken in order).

    A corpus whose distinct words all fit in ``vocab_size`` (prompts over ids without review text: 61 words on
    Beauty) gets a vocabulary of its words instead (:func:`word_vocabulary`): on such corpora the unigram
    trainer keeps a few dozen pieces and spells common words in fragments ("interacted" as ``▁in te r a c
    te d``; "a" and "user" unknown), which doubles the length of every prompt.
    """
    import sentencepiece as spm

    corpus = []
    for line in lines:
        line = ID_TOKEN_RE.sub(" ", line).strip()
        if line:
            corpus.append(line)
        if len(corpus) >= max_sentences:
            break
    if not corpus:
        raise ValueError("cannot train a tokenizer: the corpus holds no text")
    closed = word_vocabulary(corpus, vocab_size)
    if closed is not None:
        return closed
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        split_digits=True,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def word_vocabulary(corpus: Sequence[str], vocab_size: int) -> list[tuple[str, float]] | None:
    """A unigram vocabulary of whole words for a corpus of few distinct words, or None if they do not fit.

    Pieces: pad/eos/unk, then every word (``▁word``, scored by its log frequency), then every character
    alone and after ``▁`` (scored far below any word), so a word of the corpus is always one piece and an unseen
    word is spelt in characters (unknown only where a character is). The ten digits are always pieces and stay
    single, as ``split_digits`` makes them in the trained model: a word with digits (``item_1234``) contributes
    its non-digit runs (``▁item_``), never the number.
    """
    import math
    from collections import Counter

    counts: Counter = Counter()
    words = 0  # pieces of more than one character: always pieces of the vocabulary, so more than fit ends it
    for line in corpus:
        for word in line.split():
            for i, part in enumerate(re.split(r"\d+", word)):
                if part:
                    piece = ("\u2581" if i == 0 else "") + part
                    words += len(piece) > 1 and piece not in counts
                    counts[piece] += 1
        if 3 + words + 1 > vocab_size:  # (the full check below also counts the characters)
            return None
    chars = sorted({ch for line in corpus for ch in line if not ch.isspace()} | set("0123456789"))
    pieces = [p for p in counts if len(p) > 1 or p not in chars]
    if 3 + len(pieces) + 2 * len(chars) + 1 > vocab_size:
        return None
    total = sum(counts.values())
    floor = math.log(1.0 / total) - 20.0
    vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    vocab += [(p, math.log(counts[p] / total)) for p in sorted(pieces, key=lambda p: (-counts[p], p))]
    vocab += [("\u2581", floor)] + [(c, floor) for c in chars]
    vocab += [("\u2581" + c, floor) for c in chars if "\u2581" + c not in counts]
    return vocab


def build_tokenizer(
    vocab: Sequence[tuple[str, float]], id_tokens: Sequence[str] = (), model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Wrap a unigram vocabulary as a fast tokenizer and add ``id_tokens`` as whole, never-split tokens."""
    from tokenizers import normalizers
    from transformers import T5Tokenizer

    slow_built = T5Tokenizer(vocab=list(vocab), extra_ids=0)
    backend = slow_built.backend_tokenizer
    # A normalizer set on T5Tokenizer itself is lost on save; set it on the backend we keep.
    backend.normalizer = normalizers.NFKC()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=model_max_length
    )
    add_id_tokens(tokenizer, id_tokens)
    return tokenizer


def add_id_tokens(tokenizer: PreTrainedTokenizerBase, id_tokens: Sequence[str]) -> int:
    """Add id tokens not yet in the vocabulary (idempotent); return how many were added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(id_tokens) if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in new])
    return len(new)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by :func:`build_tokenizer` (or any local transformers tokenizer)."""
    return AutoTokenizer.from_pretrained(str(path))

