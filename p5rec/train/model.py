"""The backbone: ``T5ForConditionalGeneration`` built from a named preset, or loaded from a local checkpoint.

Presets are sized from measured CPU throughput (AdamW, batch 32, 2 threads, 64-token inputs):
``tiny`` (tests, ~0.2 M params, ~1,400 examples/s), ``mini`` (the CPU default, 128/512 2+2, ~180 examples/s),
``compact`` (256/1024 4+4, ~60/s), ``small`` (the t5-small shape, 48 M, ~12/s: GPU), ``base`` (t5-base shape).
Parameter counts above exclude the embedding table, which grows with the vocabulary and the id tokens.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput

from p5rec.prompts.tokenizer import add_id_tokens
from p5rec.train.routing import family_route  # noqa: F401  (re-exported beside the model it routes)

# The keyword a T5 forward takes its decoder cache by: `cache` since transformers 5.2x (`past_key_values` is
# deprecated there, removed in 5.40), `past_key_values` before. Every call that hands over a cache uses it.
CACHE_ARG = "cache" if "cache" in inspect.signature(T5ForConditionalGeneration.forward).parameters else "past_key_values"

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


class FamilyAdapters(torch.nn.Module):
    """One residual bottleneck adapter per task family after every block of a T5 stack, routed per row.

    ``h + up_f(relu(down_f(norm_f(h))))`` where ``f`` is the row's family (Houlsby et al. 2019, with T5's RMS
    norm in front). ``up`` starts at zero, so a model with adapters starts as the model without them. Rows whose
    family is -1 (a family the model was not trained with) pass through unchanged. All families of a batch are
    applied at once: each row's weights are gathered and multiplied in one batched matmul.
    """

    def __init__(self, n_blocks: int, n_families: int, d_model: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm = torch.nn.Parameter(torch.ones(n_blocks, n_families, d_model))
        self.down = torch.nn.Parameter(torch.randn(n_blocks, n_families, d_model, dim) * d_model**-0.5)
        self.up = torch.nn.Parameter(torch.zeros(n_blocks, n_families, dim, d_model))

    def forward(self, block: int, hidden: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        known = family >= 0
        f = family.clamp(min=0)
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = (x * self.norm[block, f][:, None, :]).to(hidden.dtype)
        x = torch.relu(torch.bmm(x, self.down[block, f].to(hidden.dtype)))
        x = torch.bmm(x, self.up[block, f].to(hidden.dtype))
        return hidden + x * known[:, None, None].to(hidden.dtype)


class P5T5ForConditionalGeneration(T5ForConditionalGeneration):
    """``T5ForConditionalGeneration`` with two changes: the training loss, and capacity per task family.

    **Family adapters.** With ``config.family_adapters = {"families": [...], "dim": r, "stacks": [...]}`` every
    block of the named stacks ("encoder", "decoder") is followed by a :class:`FamilyAdapters` adapter of the
    row's family, so each family keeps ``r``-wide capacity of its own beside the shared model. The family comes
    from ``family_ids`` ([B], indices into ``families``; training batches carry it) or, for code that calls the
    model without it (generation, scoring), from :func:`family_route`. A model with adapters called with neither
    raises: an unrouted call would silently score the shared model alone.

    With ``config.item_token_range = [lo, hi)`` (the added item tokens), a position whose label is an item token
    is scored by a softmax over the item tokens only, and every other labelled position (EOS, words) by the full
    vocabulary. Where the answer is an item, user and word tokens only cost time and dilute the gradient
    (measured in bench/README.md). Without the range the loss is stock T5's. Either way a training call (or
    any call with the range, a row weight or the "example" reduction) computes logits at labelled positions
    only and returns none: length-grouped batches of the main job's mixture pad the targets to 2.1 times their
    tokens, and the vocabulary projection is much of a step's work (bench/README.md, "Logits at labelled
    positions only"). Otherwise this is ``T5ForConditionalGeneration``, and a saved run loads in either class.

    **The loss's reduction.** With ``config.loss_reduction = "token"`` (stock T5's, the default) the loss is the
    mean over the batch's labelled tokens, so a family's share of the gradient is its share of the label tokens:
    a 20-token explanation outweighs ten one-item answers. ``"example"`` (P5's own, ``pretrain_model.py``) takes
    each row's mean over its labelled tokens, then the mean over the rows that have labels: every example counts
    once, whatever its target's length. Either way the Trainer divides the loss for gradient accumulation
    (``accepts_loss_kwargs = False``; stock T5 ignores ``num_items_in_batch`` while claiming it).
    """

    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        spec = getattr(config, "family_adapters", None)
        self._route: torch.Tensor | None = None
        self._row_families: torch.Tensor | None = None
        if spec:
            stacks = {"encoder": self.encoder, "decoder": self.decoder}
            unknown = set(spec["stacks"]) - set(stacks)
            if unknown:
                raise ValueError(f"family_adapters: unknown stacks {sorted(unknown)}; choose encoder, decoder")
            with torch.random.fork_rng(devices=[]):  # the global generator (the data order) as without adapters
                self.family_adapters = torch.nn.ModuleDict({
                    name: FamilyAdapters(len(stacks[name].block), len(spec["families"]), config.d_model,
                                         int(spec["dim"]))
                    for name in spec["stacks"]})
            for name, adapters in self.family_adapters.items():
                for i, block in enumerate(stacks[name].block):
                    block.register_forward_hook(self._adapter_hook(adapters, i))
        rows = getattr(config, "item_output_rows", None)
        if rows:
            # zeros until set_item_output_rows copies the shared rows in (training) or a checkpoint loads them
            self.item_head = torch.nn.Parameter(torch.zeros(int(rows[1]) - int(rows[0]), config.d_model))
            self._item_hook = self.lm_head.register_forward_hook(self._item_head_hook)

    def _item_head_hook(self, module, args, logits):
        """The item tokens' logits from ``item_head`` instead of the shared (tied) rows."""
        lo, hi = (int(v) for v in self.config.item_output_rows)
        items = args[0] @ self.item_head.to(args[0].dtype).T
        return torch.cat([logits[..., :lo], items.to(logits.dtype), logits[..., hi:]], dim=-1)

    def output_weight(self) -> torch.Tensor:
        """The [V, d] matrix the logits are computed with: the shared embedding, with ``item_head`` in the item
        rows when the model has one."""
        weight = self.lm_head.weight
        rows = getattr(self.config, "item_output_rows", None)
        if not rows:
            return weight
        lo, hi = int(rows[0]), int(rows[1])
        return torch.cat([weight[:lo], self.item_head.to(weight.dtype), weight[hi:]])

    def set_item_output_rows(self, rows) -> None:
        """Give the item tokens [lo, hi) output rows of their own, started as a copy of their shared rows: the
        encoder then reads item embeddings that the item-answering families' softmax does not pull on."""
        lo, hi = int(rows[0]), int(rows[1])
        self.config.item_output_rows = [lo, hi]
        self.item_head = torch.nn.Parameter(self.lm_head.weight.detach()[lo:hi].clone())
        if getattr(self, "_item_hook", None) is None:
            self._item_hook = self.lm_head.register_forward_hook(self._item_head_hook)

    @property
    def family_names(self) -> list[str]:
        """The families this model tells apart (adapters, loss weights); [] for a model that tells none apart."""
        spec = getattr(self.config, "family_adapters", None)
        if spec:
            return list(spec["families"])
        return list((getattr(self.config, "family_loss_weights", None) or {}).keys())

    def _row_loss_weights(self) -> torch.Tensor | None:
        """Each training row's loss weight (``config.family_loss_weights``, by the batch's ``family_ids``), or None
        where the model has no weights or the call carries no family per row."""
        weights = getattr(self.config, "family_loss_weights", None)
        family = getattr(self, "_row_families", None)
        if not weights or family is None:
            return None
        table = torch.tensor([float(weights[f]) for f in self.family_names] + [1.0])
        return table[family.cpu().long().clamp(min=-1)]  # -1 (a family without a weight): the last entry, 1

    def _routed_families(self, rows: int) -> torch.Tensor:
        """The family index of each of ``rows`` rows from the current route (one for the call, or one per
        original row when generation expanded the rows for beams)."""
        if self._route is None:
            raise RuntimeError("this model has family adapters: call it with family_ids, or inside "
                               "p5rec.train.model.family_route(model, family)")
        family = self._route
        if family.numel() != rows:
            family = family.repeat_interleave(rows // family.numel())
        return family

    def _adapter_hook(self, adapters: FamilyAdapters, i: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            family = self._routed_families(hidden.shape[0]).to(hidden.device)
            hidden = adapters(i, hidden, family)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
                labels=None, use_cache=None, family_ids=None, cache=None, **kwargs):
        # the decoder cache under the name this transformers takes (CACHE_ARG), never under both
        past_key_values = cache if cache is not None else past_key_values
        if family_ids is None:
            return self._forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                 encoder_outputs, past_key_values, inputs_embeds, decoder_inputs_embeds, labels,
                                 use_cache, **kwargs)
        before, self._route = self._route, family_ids
        self._row_families = family_ids
        try:
            return self._forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                 encoder_outputs, past_key_values, inputs_embeds, decoder_inputs_embeds, labels,
                                 use_cache, **kwargs)
        finally:
            self._route = before
            self._row_families = None

    def _forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                 past_key_values, inputs_embeds, decoder_inputs_embeds, labels, use_cache, **kwargs):
        span = getattr(self.config, "item_token_range", None)
        reduction = getattr(self.config, "loss_reduction", "token")
        row_weights = self._row_loss_weights()
        # stock T5 (with logits) where its loss is ours and speed does not matter: labels outside training
        stock_loss = not span and reduction == "token" and row_weights is None
        if labels is None or (stock_loss and not self.training):
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                use_cache=use_cache, **{CACHE_ARG: past_key_values}, **kwargs)
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
        loss = item_softmax_loss(hidden, labels.to(hidden.device), self.output_weight(), span, reduction,
                                 None if row_weights is None else row_weights.to(hidden.device))
        return Seq2SeqLMOutput(loss=loss, encoder_last_hidden_state=encoder_outputs[0])


LOSS_REDUCTIONS = ("token", "example")


def item_softmax_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, span,
                      reduction: str = "token", row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over labelled positions: item labels against item tokens only (when ``span`` is given),
    others against the whole vocabulary.

    ``hidden`` [B, T, d] (already scaled as the lm head expects), ``labels`` [B, T] with -100 for no label,
    ``weight`` the [V, d] output embedding, ``span`` the item tokens' [lo, hi) or None (every label against the
    whole vocabulary). ``reduction``: "token", the mean over labelled positions; "example", each row's mean over
    its labelled positions, then the mean over the rows with any (P5's). ``row_weights`` [B] multiplies each row's
    terms (its family's loss weight); the denominators stay the unweighted counts, so weight 1 everywhere is the
    unweighted loss.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r}: choose one of {', '.join(LOSS_REDUCTIONS)}")
    mask = labels != -100
    h, y = hidden[mask], labels[mask]
    if not span:
        nll = F.cross_entropy((h @ weight.T).float(), y, reduction="none")
    else:
        lo, hi = int(span[0]), int(span[1])
        is_item = (y >= lo) & (y < hi)
        nll = h.new_zeros(y.shape, dtype=torch.float32)
        if is_item.any():
            nll = nll.index_put((is_item.nonzero()[:, 0],), F.cross_entropy(
                (h[is_item] @ weight[lo:hi].T).float(), y[is_item] - lo, reduction="none"))
        if (~is_item).any():
            nll = nll.index_put(((~is_item).nonzero()[:, 0],), F.cross_entropy(
                (h[~is_item] @ weight.T).float(), y[~is_item], reduction="none"))
    rows = mask.nonzero()[:, 0]
    if row_weights is not None:
        nll = nll * row_weights.to(nll.dtype)[rows]
    if reduction == "token":
        return nll.sum() / mask.sum().clamp(min=1)
    per_row = nll.new_zeros(labels.shape[0]).index_add(0, rows, nll)
    counts = mask.sum(1)
    labelled = counts > 0
    return (per_row[labelled] / counts[labelled]).mean() if labelled.any() else nll.sum()


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
                embedding_init_std: float | None = None, family_adapters: dict | None = None, **shape_overrides):
    """A freshly initialised T5 whose vocabulary covers ``tokenizer`` (rounded up to a multiple of 8).

    ``embedding_init_std`` re-initialises the shared (tied) embedding with that standard deviation; HF's T5
    default is 1.0, and with T5's output scaling by d_model^-0.5 that makes every logit start large.
    ``family_adapters`` ({"families", "dim", "stacks"}) adds capacity per family
    (:class:`P5T5ForConditionalGeneration`); the shared weights are the same as without it, for the same seed.
    """
    vocab_size = -(-len(tokenizer) // 8) * 8
    config = t5_config(preset, vocab_size, dropout_rate, **shape_overrides)
    if family_adapters:
        config.family_adapters = dict(family_adapters)
    model = P5T5ForConditionalGeneration(config)
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
