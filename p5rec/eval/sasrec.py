"""SASRec (Kang & McAuley, ICDM 2018) as a neural sequential baseline, in the strong setting.

Why it is here: P5's sequential numbers are only meaningful next to a well-trained ID-based sequential model.
Later work (Klenitskiy & Vasilev 2023, "Turning Dross Into Gold Loss: is BERT4Rec really better than
SASRec?") showed that SASRec trained with a full-softmax cross-entropy over the whole catalogue (``loss="ce"``)
is much stronger than the original one-sampled-negative binary cross-entropy (``loss="bce"``); both are
offered, ``"ce"`` is the default.

Model: item embedding (row 0 = padding, tied with the output layer), learned absolute positional embedding
over a left-padded window of ``max_len``, ``blocks`` causal pre-LN transformer blocks, a final LayerNorm.
The score of item ``i`` after a prefix is ``h_last . E[i]``.

Data contract (design.md section 2): raw string item ids. :class:`ItemVocab` maps the items seen in the
training sequences to ``1..n`` (sorted, so the mapping does not depend on row order); items unknown at
inference are dropped from histories (counted in the log) and can never be recommended.

Protocol of :func:`evaluate_sasrec` (the standard leave-one-out one of the SASRec paper):

* train on each user's training part ``seq[:-2]`` (= the ``valid`` row's history),
* early-stop on ``valid`` (history ``seq[:-2]`` -> target ``seq[-2]``) by NDCG@10,
* score ``test`` (history ``seq[:-1]`` -> target ``seq[-1]``) with the best-on-valid weights. The valid
  target is *input* at test time but never a training target.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from p5rec.eval.metrics import ranking_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "ItemVocab",
    "SASRec",
    "SASRecConfig",
    "evaluate_sasrec",
    "fit",
    "load",
    "recommend",
    "save",
    "score_histories",
    "sequential_training_data",
]

CONFIG_NAME = "sasrec_config.json"
VOCAB_NAME = "vocab.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"


# ---------------------------------------------------------------------------------------------------------
# Config and vocabulary
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SASRecConfig:
    """Model shape and training settings. Defaults follow the SASRec paper except ``loss="ce"`` (see module)."""

    hidden: int = 64  # embedding and transformer width; the point-wise FFN has the same width, as in the paper
    blocks: int = 2  # transformer blocks
    heads: int = 1  # attention heads (hidden must be divisible by heads)
    dropout: float = 0.2  # on embeddings (data dropout), attention weights, FFN and residual branches
    max_len: int = 50  # window of the most recent items; longer sequences keep only their tail
    lr: float = 1e-3  # Adam, betas (0.9, 0.98) as in the paper
    batch: int = 256  # users (sequences) per training step
    epochs: int = 200  # upper bound; early stopping on valid usually ends training long before
    weight_decay: float = 0.0
    seed: int = 42
    loss: Literal["ce", "bce"] = "ce"  # full-softmax CE over all items, or BCE with one sampled negative
    device: str = "auto"  # "auto" = cuda if available, else cpu; or any torch device string
    patience: int = 10  # epochs without a better valid NDCG@10 before stopping (only with valid data)
    eval_every: int = 1  # validate every this many epochs
    eval_batch: int = 1024  # histories per scoring step in recommend / validation
    max_seconds: float | None = None  # stop after the epoch in which training time (validation excluded) passes this
    # the validation metric that picks the best epoch: NDCG@10 with the history's items excluded (SASRec's own
    # protocol), or with them allowed (P5's; on Beauty it peaks ~10 epochs earlier, as the model learns to
    # repeat history items). Select on the protocol that will be reported.
    select_exclude_history: bool = True

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"SASRecConfig.loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.hidden % self.heads:
            raise ValueError(f"SASRecConfig: hidden={self.hidden} is not divisible by heads={self.heads}")
        for name in ("hidden", "blocks", "heads", "max_len", "batch", "epochs", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SASRecConfig:
        """Build from a dict; unknown keys (e.g. from a newer version) warn and are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"p5rec_version"})
        if unknown:
            warnings.warn(f"SASRecConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


class ItemVocab:
    """Raw item id <-> model index. Index 0 is padding and never an item; items are ``1..len(self)``."""

    def __init__(self, items: Sequence[str]):
        self.items: list[str] = list(items)
        self.index: dict[str, int] = {item: i + 1 for i, item in enumerate(self.items)}
        if len(self.index) != len(self.items):
            raise ValueError("ItemVocab: duplicate item ids")

    @classmethod
    def build(cls, sequences: Sequence[Sequence[str]]) -> ItemVocab:
        """Every item in ``sequences``, sorted (deterministic, independent of row order)."""
        return cls(sorted({item for seq in sequences for item in seq}))

    def __len__(self) -> int:  # number of real items, padding excluded
        return len(self.items)

    @property
    def size(self) -> int:  # rows of the embedding table, padding included
        return len(self.items) + 1

    def encode(self, seq: Sequence[str]) -> list[int]:
        """Known items only; unknown ones are dropped (the caller counts them if it cares)."""
        return [self.index[item] for item in seq if item in self.index]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.items[i - 1] for i in ids]

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"items": self.items}, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> ItemVocab:
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["items"])


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


class SASRec(nn.Module):
    """Causal self-attention over a left-padded item window; ``forward`` returns hidden states ``[B, L, H]``."""

    def __init__(self, n_items: int, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, config.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=config.hidden,
                nhead=config.heads,
                dim_feedforward=config.hidden,
                dropout=config.dropout,
                activation="relu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.blocks)
        )
        self.final_norm = nn.LayerNorm(config.hidden)  # pre-LN blocks leave the residual stream unnormalised
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier-normal on every matrix, as the reference PyTorch port does; the default N(0, 1) embedding init
        # times sqrt(hidden) would swamp the positional embedding.
        for name, param in self.named_parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B * heads, L, L]`` mask, True = may not attend.

        Causal, and padded keys are hidden. Every position may attend to itself, so a padded query row is
        never fully masked (that would give NaN); padded positions' outputs are never read.
        """
        b, length = input_ids.shape
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=input_ids.device), diagonal=1)
        pad_key = (input_ids == 0)[:, None, :]  # [B, 1, L]
        eye = torch.eye(length, dtype=torch.bool, device=input_ids.device)
        mask = (causal[None] | pad_key) & ~eye[None]  # [B, L, L]
        return mask.repeat_interleave(self.config.heads, dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids``: ``[B, L]`` long, left-padded with 0, ``L <= max_len``. Returns ``[B, L, hidden]``."""
        length = input_ids.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"SASRec: sequence length {length} > max_len {self.config.max_len}")
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=input_ids.device)
        x = self.item_emb(input_ids) * math.sqrt(self.config.hidden) + self.pos_emb(positions)[None]
        x = self.emb_dropout(x)
        keep = (input_ids != 0).unsqueeze(-1).to(x.dtype)
        x = x * keep
        mask = self.attention_mask(input_ids)
        for layer in self.layers:
            x = layer(x, src_mask=mask) * keep  # padded positions stay zero, as in the paper
        return self.final_norm(x)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the whole table (padding column included; callers mask it): ``[..., n_items + 1]``."""
        return hidden @ self.item_emb.weight.T


# ---------------------------------------------------------------------------------------------------------
# Batching helpers
# ---------------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pad_left(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Keep each sequence's last ``length`` ids, left-pad with 0: ``[len(seqs), length]`` long."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-length:]
        if len(tail):
            out[row, length - len(tail):] = tail
    return torch.from_numpy(out)


def _as_sequences(sequences: Mapping[str, Sequence[str]] | Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(sequences, Mapping):
        return [list(seq) for seq in sequences.values()]
    return [list(seq) for seq in sequences]


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def _batch_loss(model: SASRec, batch: torch.Tensor, loss: str, generator: torch.Generator) -> torch.Tensor:
    """Next-item loss at every non-padded position of ``batch`` ``[B, max_len + 1]``."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = model(inputs)
    valid = targets != 0  # inputs are non-padded wherever targets are (left padding)
    h, y = hidden[valid], targets[valid]  # [N, H], [N]: only real positions, so [N, V] stays small
    if loss == "ce":
        logits = model.scores(h)
        logits[:, 0] = float("-inf")  # padding is never a class
        return F.cross_entropy(logits, y)
    # "bce": one uniform negative per position, redrawn where it hits the positive (the paper excludes the
    # user's whole sequence; one redraw of the exact positive is the vectorised approximation).
    n = model.n_items
    neg = torch.randint(1, n + 1, y.shape, generator=generator, device="cpu").to(y.device)
    clash = neg == y
    if clash.any():
        neg[clash] = torch.randint(1, n + 1, (int(clash.sum()),), generator=generator, device="cpu").to(y.device)
    pos_logit = (h * model.item_emb(y)).sum(-1)
    neg_logit = (h * model.item_emb(neg)).sum(-1)
    return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
        F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


def fit(
    sequences: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
    config: SASRecConfig | None = None,
    valid: tuple[Sequence[Sequence[str]], Sequence[str]] | None = None,
) -> tuple[SASRec, ItemVocab]:
    """Train SASRec on chronological item sequences.

    Args:
        sequences: one training sequence per user (``{user: [item, ...]}`` or a list of lists), oldest first.
            Every position ``t >= 1`` is a target with input ``seq[:t]`` (shifted inputs, one forward pass per
            sequence); a sequence longer than ``max_len + 1`` contributes only its last ``max_len + 1`` items.
            Sequences of length < 2 carry no target and are skipped.
        config: :class:`SASRecConfig` (defaults if None).
        valid: optional ``(histories, targets)`` for early stopping on NDCG@10 (full ranking, history items
            excluded). The best epoch's weights are restored at the end.

    Returns:
        ``(model, vocab)``: the model in eval mode on ``config.device``, and the item vocabulary (built from
        ``sequences``).
    """
    config = config or SASRecConfig()
    seqs = _as_sequences(sequences)
    vocab = ItemVocab.build(seqs)
    if len(vocab) == 0:
        raise ValueError("fit: no items in the training sequences")
    encoded = [vocab.encode(seq) for seq in seqs]
    encoded = [seq for seq in encoded if len(seq) >= 2]
    if not encoded:
        raise ValueError("fit: no training sequence has 2 or more items")
    data = _pad_left(encoded, config.max_len + 1)  # built once; batches are row slices
    n_targets = int((data[:, 1:] != 0).sum())
    logger.info("SASRec fit: %d sequences (%d skipped, < 2 items), %d items, %d training targets, loss=%s",
                len(encoded), len(seqs) - len(encoded), len(vocab), n_targets, config.loss)

    device = _resolve_device(config.device)
    torch.manual_seed(config.seed)  # before the model exists: init and dropout are reproducible
    generator = torch.Generator().manual_seed(config.seed)  # shuffling and negatives
    model = SASRec(len(vocab), config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                 weight_decay=config.weight_decay)

    best_score, best_state, best_epoch, bad_rounds = -1.0, None, 0, 0
    curve: list[dict[str, float]] = []  # per validated epoch: training seconds (validation excluded), metrics
    train_seconds, t_epoch = 0.0, time.perf_counter()
    bar = tqdm(range(1, config.epochs + 1), desc="SASRec", unit="epoch", disable=None)
    for epoch in bar:
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(data), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch):
            batch = data[order[start:start + config.batch]].to(device)
            loss = _batch_loss(model, batch, config.loss, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.item_emb.weight[0].zero_()  # keep padding inert (Adam would move it via weight decay)
            n = int((batch[:, 1:] != 0).sum())
            total, count = total + loss.item() * n, count + n
        epoch_loss = total / max(count, 1)
        train_seconds += time.perf_counter() - t_epoch
        postfix = {"loss": f"{epoch_loss:.4f}"}
        log_valid = ""
        if valid is not None and epoch % config.eval_every == 0:
            ranked = recommend(model, vocab, valid[0], k=10, exclude_history=True)
            excluded = ranking_metrics(ranked, list(valid[1]), ks=(10,))["NDCG@10"]
            plain = ranking_metrics(recommend(model, vocab, valid[0], k=10), list(valid[1]), ks=(10,))
            curve.append({"epoch": epoch, "train_seconds": round(train_seconds, 1), "loss": round(epoch_loss, 4),
                          "valid_NDCG@10_exclude_history": excluded, "valid_NDCG@10": plain["NDCG@10"],
                          "valid_HR@10": plain["HR@10"]})
            score = excluded if config.select_exclude_history else plain["NDCG@10"]
            postfix["val_ndcg10"] = f"{score:.4f}"
            log_valid = f", valid NDCG@10 {excluded:.4f} ({plain['NDCG@10']:.4f} with history items)"
            if score > best_score:
                best_score, best_epoch, bad_rounds = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_rounds += 1
        bar.set_postfix(postfix)
        logger.info("SASRec epoch %d: loss %.4f%s", epoch, epoch_loss, log_valid)
        if valid is not None and bad_rounds >= config.patience:
            logger.info("SASRec: early stop at epoch %d (best valid NDCG@10 %.4f at epoch %d)",
                        epoch, best_score, best_epoch)
            break
        if config.max_seconds is not None and train_seconds >= config.max_seconds:
            logger.info("SASRec: training budget of %.0f s spent at epoch %d", config.max_seconds, epoch)
            break
    bar.close()
    model.epochs_run = epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    # plain attributes for reports (not part of the state dict): epochs trained, best epoch on valid
    model.best_epoch = best_epoch
    model.best_valid_ndcg10 = best_score if best_state is not None else None
    model.curve = curve
    return model, vocab


# ---------------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_histories(model: SASRec, vocab: ItemVocab, histories: Sequence[Sequence[str]]) -> torch.Tensor:
    """Scores over every item for each history: float ``[len(histories), n_items + 1]`` on CPU (column 0 = pad).

    Unknown history items are dropped; an empty history (after dropping) gets the all-padding input, whose
    scores are defined but uninformative. Prefer :func:`recommend` unless you need raw scores.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    step = model.config.eval_batch
    for start in range(0, len(histories), step):
        ids = _pad_left([vocab.encode(h) for h in histories[start:start + step]], model.config.max_len)
        out.append(model.scores(model(ids.to(device))[:, -1]).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, vocab.size)


@torch.no_grad()
def recommend(
    model: SASRec,
    vocab: ItemVocab,
    histories: Sequence[Sequence[str]],
    k: int = 20,
    exclude_history: bool = False,
) -> list[list[str]]:
    """Top-``k`` raw item ids per history, best first, ranked over the full catalogue.

    Padding is never returned; neither are items outside ``vocab``. With ``exclude_history`` the known items
    of each history are removed first (lists may then be shorter than ``k`` when the catalogue runs out).
    Ties are broken by ``torch.topk`` (lower index first in practice); exact ties are rare with float scores.
    """
    if k < 1:
        raise ValueError(f"recommend: k must be >= 1, got {k}")
    histories = [list(h) for h in histories]
    unknown = sum(1 for h in histories for item in h if item not in vocab.index)
    if unknown:
        logger.info("recommend: %d history items are not in the vocabulary and were dropped", unknown)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    k_eff = min(k, len(vocab))
    ranked: list[list[str]] = []
    step = model.config.eval_batch
    for start in range(0, len(histories), step):
        chunk = histories[start:start + step]
        encoded = [vocab.encode(h) for h in chunk]
        scores = model.scores(model(_pad_left(encoded, model.config.max_len).to(device))[:, -1])
        scores[:, 0] = float("-inf")
        if exclude_history:
            rows = [r for r, seq in enumerate(encoded) for _ in seq]
            cols = [i for seq in encoded for i in seq]
            if cols:
                scores[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = float("-inf")
        values, indices = torch.topk(scores, k_eff, dim=1)
        keep = torch.isfinite(values).cpu().numpy()
        indices = indices.cpu().numpy()
        for row in range(len(chunk)):
            ranked.append(vocab.decode(indices[row][keep[row]].tolist()))
    model.train(was_training)
    return ranked


# ---------------------------------------------------------------------------------------------------------
# Evaluation on a prepared sequential DatasetDict
# ---------------------------------------------------------------------------------------------------------


def sequential_training_data(
    prepared_sequential_dd: Mapping[str, Any],
) -> tuple[dict[str, list[str]], tuple[list[list[str]], list[str]]]:
    """``(train, valid)`` for :func:`fit` from the prepared ``sequential`` DatasetDict (design.md section 2).

    A user's ``valid`` row has ``history = seq[:-2]``, which is exactly that user's training part, so
    ``train = {user: valid history}``; ``valid = (valid histories, valid targets)`` for early stopping. The
    ``train`` split (one row per prefix) carries no more information and is not read.
    """
    rows = prepared_sequential_dd["valid"]
    histories = [list(h) for h in rows["history"]]
    users = list(rows["user"])
    if len(set(users)) != len(users):
        raise ValueError("sequential_training_data: the valid split has more than one row for some user")
    return dict(zip(users, histories)), (histories, list(rows["target"]))


def evaluate_sasrec(
    prepared_sequential_dd: Mapping[str, Any],
    config: SASRecConfig | None = None,
    split: str = "test",
    ks: Sequence[int] = (1, 5, 10),
    k: int = 20,
    model_and_vocab: tuple[SASRec, ItemVocab] | None = None,
) -> dict[str, dict[str, float]]:
    """Train (unless ``model_and_vocab`` is given) and score SASRec on the sequential ``split``.

    Protocol (module docstring): train on ``seq[:-2]`` (the ``valid`` histories, one per user), early-stop on
    ``valid``, score ``split`` (``"test"``: ``seq[:-1] -> seq[-1]``; ``"valid"`` scores the early-stopping
    split itself, optimistic by construction).

    Returns:
        ``{"exclude_history": metrics, "no_exclusion": metrics}`` (the two protocols of the popularity
        baseline, :func:`p5rec.eval.baselines.popularity_ranking`); metrics from
        :func:`p5rec.eval.metrics.ranking_metrics` over top-``k`` lists, plus ``"n"`` (users scored). Only ``MRR`` depends on ``k``.
    """
    config = config or SASRecConfig()
    if model_and_vocab is None:
        train, valid = sequential_training_data(prepared_sequential_dd)
        model, vocab = fit(train, config, valid=valid)
    else:
        model, vocab = model_and_vocab
    rows = prepared_sequential_dd[split]
    histories, targets = [list(h) for h in rows["history"]], list(rows["target"])
    unseen = sum(1 for t in targets if t not in vocab.index)
    if unseen:
        logger.info("evaluate_sasrec[%s]: %d of %d targets never occur in training (always a miss)",
                    split, unseen, len(targets))
    out: dict[str, dict[str, float]] = {}
    for name, exclude in (("exclude_history", True), ("no_exclusion", False)):
        ranked = recommend(model, vocab, histories, k=k, exclude_history=exclude)
        out[name] = {**ranking_metrics(ranked, targets, ks), "n": len(targets)}
    return out


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------


def save(model: SASRec, vocab: ItemVocab, config: SASRecConfig, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (or ``pytorch_model.bin`` without safetensors), config and vocab JSON."""
    from p5rec import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover - safetensors is normally installed with transformers
        torch.save(state, directory / TORCH_NAME)
    else:
        save_file(state, str(directory / SAFETENSORS_NAME))
    payload = {**config.to_dict(), "n_items": len(vocab), "p5rec_version": __version__}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    vocab.to_json(directory / VOCAB_NAME)
    return directory


def load(directory: str | Path, device: str | None = None) -> tuple[SASRec, ItemVocab, SASRecConfig]:
    """Inverse of :func:`save`: ``(model in eval mode, vocab, config)``. ``device`` overrides the config's."""
    directory = Path(directory)
    data = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    n_items = data.pop("n_items", None)
    config = SASRecConfig.from_dict(data)
    vocab = ItemVocab.from_json(directory / VOCAB_NAME)
    if n_items is not None and n_items != len(vocab):
        raise ValueError(f"{directory}: config says {n_items} items but vocab.json has {len(vocab)}")
    if (directory / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / SAFETENSORS_NAME))
    elif (directory / TORCH_NAME).is_file():
        state = torch.load(directory / TORCH_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: neither {SAFETENSORS_NAME} nor {TORCH_NAME}")
    model = SASRec(len(vocab), config)
    model.load_state_dict(state)
    model.to(_resolve_device(device or config.device)).eval()
    return model, vocab, config
