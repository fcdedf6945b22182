"""The backbone: ``T5ForConditionalGeneration`` built from a named preset, or loaded from a local checkpoint.

Presets are sized from measured CPU throughput (../shared/TOOLCHAIN.md, batch 32, 2 threads, 64-token inputs):
``tiny`` (tests, ~0.2 M params, ~1,400 examples/s), ``mini`` (the CPU default, 128/512 2+2, ~180 examples/s),
``compact`` (256/1024 4+4, ~60/s), ``small`` (the t5-small shape, 48 M, ~12/s: GPU), ``base`` (t5-base shape).
Parameter counts above exclude the embedding table, which grows with the vocabulary and the id tokens.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration

from p5rec.tokenizer import add_id_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    d_model: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    d_kv: int
    dropout_rate: float = 0.1


PRESETS: dict[str, Preset] = {
    "tiny": Preset(d_model=64, d_ff=256, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=32, dropout_rate=0.0),
    "mini": Preset(d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32),
    "compact": Preset(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64),
    "small": Preset(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
    "base": Preset(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
}


def t5_config(preset: str, vocab_size: int, dropout_rate: float | None = None) -> T5Config:
    """A T5 config for ``preset`` over a vocabulary of ``vocab_size`` (pad 0, eos 1, decoder start = pad)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = asdict(PRESETS[preset])
    if dropout_rate is not None:
        shape["dropout_rate"] = dropout_rate
    return T5Config(
        vocab_size=vocab_size,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        **shape,
    )


def build_model(preset: str, tokenizer: PreTrainedTokenizerBase, dropout_rate: float | None = None):
    """A freshly initialised T5 whose vocabulary covers ``tokenizer`` (rounded up to a multiple of 8)."""
    vocab_size = -(-len(tokenizer) // 8) * 8
    model = T5ForConditionalGeneration(t5_config(preset, vocab_size, dropout_rate))
    _align_generation_config(model, tokenizer)
    n = sum(p.numel() for p in model.parameters())
    logger.info("built T5 preset %r: %.2f M parameters, vocabulary %d", preset, n / 1e6, vocab_size)
    return model


def load_pretrained(path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, id_tokens=()):
    """Load a local T5 checkpoint (and its tokenizer), extending the vocabulary with p5rec's id tokens.

    ``path`` is a directory written by ``save_pretrained`` (a p5rec run, or a pretrained t5 the user has on disk).
    Nothing is fetched from a hub: a path that does not exist is an error here, not a download.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: no config.json; --model_name_or_path must be a local directory written by save_pretrained"
        )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    added = add_id_tokens(tokenizer, id_tokens)
    model = T5ForConditionalGeneration.from_pretrained(str(path))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    _align_generation_config(model, tokenizer)
    logger.info("loaded %s (%d id tokens added, vocabulary %d)", path, added, len(tokenizer))
    return model, tokenizer


def _align_generation_config(model, tokenizer) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.decoder_start_token_id = model.config.decoder_start_token_id
    # Generation settings are chosen per task by p5rec.decoding; keep the saved defaults neutral.
    gc.max_length = None
    gc.max_new_tokens = 32
