"""The backbone: ``T5ForConditionalGeneration`` built from a named preset, or loaded from a local checkpoint.

Presets are sized from measured CPU throughput (AdamW, batch 32, 2 threads, 64-token inputs):
``tiny`` (tests, ~0.2 M params, ~1,400 examples/s), ``mini`` (the CPU default, 128/512 2+2, ~180 examples/s),
``compact`` (256/1024 4+4, ~60/s), ``small`` (the t5-small shape, 48 M, ~12/s: GPU), ``base`` (t5-base shape).
Parameter counts above exclude the embedding table, which grows with the vocabulary and the id tokens.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput

from p5rec.prompts.tokenizer import add_id_tokens

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
    # mini, the CPU main job's shape, without dropout: with T5's 0.1 its answers did not depend on the prompt's
    # user, item or history in the main job's budget (bench/README.md, "Does the model read its prompt?")
    "mini": Preset(d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32, dropout_rate=0.0),
    "compact": Preset(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64),
    "small": Preset(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
    "base": Preset(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
}


class P5T5ForConditionalGeneration(T5ForConditionalGeneration):
    """``T5ForConditionalGeneration`` with one change, to the training loss.

    With ``config.item_token_range = [lo, hi)`` (the added item tokens), a position whose label is an item token
    is scored by a softmax over the item tokens only, and every other labelled position (EOS, words) by the full
    vocabulary. Where the answer is an item, user and word tokens only cost time and dilute the gradient
    (measured in bench/README.md). Logits are computed at labelled positions only, and no ``logits`` are
    returned with such a loss. Without labels or without the range this is ``T5ForConditionalGeneration``, and
    a saved run loads in either class.

    The loss is the mean over the batch's labelled tokens, so the Trainer divides it for gradient
    accumulation (``accepts_loss_kwargs = False``; stock T5 ignores ``num_items_in_batch`` while claiming it).
    """

    accepts_loss_kwargs = False

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
                labels=None, use_cache=None, **kwargs):
        span = getattr(self.config, "item_token_range", None)
        if labels is None or not span:
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, use_cache=use_cache, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                           inputs_embeds=inputs_embeds)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        hidden = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                              inputs_embeds=decoder_inputs_embeds, encoder_hidden_states=encoder_outputs[0],
                              encoder_attention_mask=attention_mask, use_cache=False)[0]
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.model_dim**-0.5)
        loss = item_softmax_loss(hidden, labels.to(hidden.device), self.lm_head.weight, span)
        return Seq2SeqLMOutput(loss=loss, encoder_last_hidden_state=encoder_outputs[0])


def item_softmax_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, span) -> torch.Tensor:
    """Mean cross-entropy over labelled positions: item labels against item tokens only, others against all.

    ``hidden`` [B, T, d] (already scaled as the lm head expects), ``labels`` [B, T] with -100 for no label,
    ``weight`` the [V, d] output embedding, ``span`` the item tokens' [lo, hi).
    """
    lo, hi = int(span[0]), int(span[1])
    mask = labels != -100
    h, y = hidden[mask], labels[mask]
    is_item = (y >= lo) & (y < hi)
    total = hidden.new_zeros(())
    if is_item.any():
        total = total + F.cross_entropy(h[is_item] @ weight[lo:hi].T, y[is_item] - lo, reduction="sum")
    if (~is_item).any():
        total = total + F.cross_entropy(h[~is_item] @ weight.T, y[~is_item], reduction="sum")
    return total / mask.sum().clamp(min=1)


def item_token_range(tokenizer: PreTrainedTokenizerBase, item_tokens) -> list[int] | None:
    """[lo, hi) of the item tokens' ids if they are contiguous (they are when added in one call), else None."""
    ids = sorted(tokenizer.convert_tokens_to_ids(list(item_tokens)))
    if not ids or ids[-1] - ids[0] + 1 != len(ids) or tokenizer.unk_token_id in ids:
        return None
    return [ids[0], ids[-1] + 1]


def t5_config(preset: str, vocab_size: int, dropout_rate: float | None = None, **shape_overrides) -> T5Config:
    """A T5 config for ``preset`` over a vocabulary of ``vocab_size`` (pad 0, eos 1, decoder start = pad).

    ``shape_overrides`` replace fields of the preset (d_model, d_ff, num_layers, num_decoder_layers,
    num_heads, d_kv); None values are ignored."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = asdict(PRESETS[preset])
    unknown = set(shape_overrides) - set(shape)
    if unknown:
        raise ValueError(f"unknown model shape fields {sorted(unknown)}; known: {sorted(shape)}")
    shape.update({k: v for k, v in shape_overrides.items() if v is not None})
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


def build_model(preset: str, tokenizer: PreTrainedTokenizerBase, dropout_rate: float | None = None,
                embedding_init_std: float | None = None, **shape_overrides):
    """A freshly initialised T5 whose vocabulary covers ``tokenizer`` (rounded up to a multiple of 8).

    ``embedding_init_std`` re-initialises the shared (tied) embedding with that standard deviation; HF's T5
    default is 1.0, and with T5's output scaling by d_model^-0.5 that makes every logit start large.
    """
    vocab_size = -(-len(tokenizer) // 8) * 8
    model = P5T5ForConditionalGeneration(t5_config(preset, vocab_size, dropout_rate, **shape_overrides))
    if embedding_init_std is not None:
        with torch.no_grad():
            model.shared.weight.normal_(0.0, embedding_init_std)
    _align_generation_config(model, tokenizer)
    n = sum(p.numel() for p in model.parameters())
    logger.info("built T5 preset %r: %.2f M parameters, vocabulary %d", preset, n / 1e6, vocab_size)
    return model


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "sentencepiece.bpe.model")


def checkpoint_problem(path: str | Path, need_tokenizer: bool = True) -> str | None:
    """Why ``path`` cannot be loaded as a local checkpoint (one line), or None. transformers 5 builds an empty
    default tokenizer for a directory without one, silently, so the files are looked for first."""
    path = Path(path)
    if not (path / "config.json").exists():
        return f"{path}: no config.json; --model_name_or_path must be a local directory written by save_pretrained"
    if need_tokenizer and not any((path / f).exists() for f in TOKENIZER_FILES):
        return f"{path}: no tokenizer saved beside the checkpoint (expected one of {', '.join(TOKENIZER_FILES)})"
    return None


def _checkpoint_dir(path: str | Path, need_tokenizer: bool) -> Path:
    problem = checkpoint_problem(path, need_tokenizer)
    if problem:
        raise FileNotFoundError(problem)
    return Path(path)


def load_checkpoint_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a local checkpoint: the one its embedding rows were trained for."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_checkpoint_dir(path, need_tokenizer=True)))


def load_pretrained(path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, id_tokens=()):
    """Load a local T5 checkpoint (and its tokenizer), extending the vocabulary with p5rec's id tokens.

    ``path`` is a directory written by ``save_pretrained`` (a p5rec run, or a pretrained t5 the user has on disk).
    Nothing is fetched from a hub: a path that does not exist is an error here, not a download.
    """
    path = _checkpoint_dir(path, need_tokenizer=tokenizer is None)
    if tokenizer is None:
        tokenizer = load_checkpoint_tokenizer(path)
    added = add_id_tokens(tokenizer, id_tokens)
    model = P5T5ForConditionalGeneration.from_pretrained(str(path))
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
    # Generation settings are chosen per task by p5rec.eval.decoding; keep the saved defaults neutral.
    gc.max_length = None
    gc.max_new_tokens = 32
