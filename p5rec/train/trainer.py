"""The Trainer p5rec trains with: ``Seq2SeqTrainer`` plus a learning rate of its own for the shared embedding.

Why: HF's T5 multiplies the decoder output by d_model^-0.5 (tied embeddings) and does not scale the input
embedding, where SASRec multiplies the input by sqrt(d) and reads logits as h.E. The two are the same function
of a rescaled embedding, but Adam's steps are scale-free: relative to its size, a T5 embedding then moves
sqrt(d_model) times slower than SASRec's. ``embedding_lr_multiplier`` (with ``embedding_init_std``, in
p5rec.train.model) gives the embedding SASRec's dynamics without changing the architecture or the checkpoint format.
Measured in bench/README.md ("What makes the sequence objective learn").
"""

from __future__ import annotations

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_pt_utils import get_length_grouped_indices

# Length-grouped batches are drawn from mega-batches of this many batches (HF's sampler uses 50). Sorting fewer
# rows together keeps batches more mixed: on Beauty's sequence objective, 8 learnt 10 % more per second than 50
# at the same speed, and both twice as fast as unsorted batches (bench/README.md).
MEGA_BATCHES = 8
# Family-grouped batches (``--batch_grouping family``) come from mega-batches this large, so that each family fills
# whole batches of one (with 8, a family of 15 % of the rows would spill into mixed batches in most mega-batches).
FAMILY_MEGA_BATCHES = 50


class GroupedByLength(torch.utils.data.Sampler):
    """HF's length-grouped order (random mega-batches, each sorted by length, the longest batch first) with
    ``MEGA_BATCHES`` batches per mega-batch; randomness from torch's global generator, as HF's sampler.

    ``shuffle_batches`` then draws the order of the batches at random: with keys that sort one family after
    another, a mega-batch would otherwise end with the same family every time (measured: the text families
    collapsed to ROUGE-L 0.05, bench/README.md)."""

    def __init__(self, lengths, batch_size: int, mega_batches: int = MEGA_BATCHES, shuffle_batches: bool = False):
        self.lengths, self.batch_size, self.mega = list(lengths), batch_size, mega_batches
        self.shuffle_batches = shuffle_batches

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=self.mega)
        if not self.shuffle_batches:
            return iter(order)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return iter([i for b in torch.randperm(len(batches)).tolist() for i in batches[b]])


class P5Trainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` whose optimizer gives the shared (tied) embedding ``embedding_lr_multiplier`` times
    the learning rate, in a parameter group of its own; the schedule scales every group alike. Resuming
    needs the same multiplier (the optimizer state is saved per group).

    ``train_lengths`` (one per training row) drive ``train_sampling_strategy="group_by_length"``: the
    Trainer would measure the prompt alone, which is the same for every sequence row whose target length
    varies (and it reads the dataset row by row to do so).
    """

    def __init__(self, *args, embedding_lr_multiplier: float = 1.0, id_rows=None, id_lr_multiplier: float = 1.0,
                 train_lengths=None, train_mega_batches: int = MEGA_BATCHES, shuffle_batches: bool = False,
                 curve=None, **kwargs):
        self.embedding_lr_multiplier = float(embedding_lr_multiplier)
        self.id_rows = None if not id_rows else torch.as_tensor(sorted(id_rows), dtype=torch.long)
        self.id_lr_multiplier = float(id_lr_multiplier)
        self.train_lengths = None if train_lengths is None else list(train_lengths)
        self.train_mega_batches = int(train_mega_batches)
        self.shuffle_batches = bool(shuffle_batches)
        self.curve = curve  # a LearningCurveCallback whose per-family metrics join each evaluation's
        super().__init__(*args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's loop, plus the learning curve's per-family validation metrics in its metrics: the
        Trainer logs them right after (``report_to`` integrations, ``log_history``) and best-model selection
        reads them."""
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.curve is not None and prefix == "eval":
            self.curve.measure(self.model, self.state, output.metrics)
        return output

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.train_lengths is not None:
            return GroupedByLength(self.train_lengths,
                                   self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                   self.train_mega_batches, self.shuffle_batches)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if getattr(optimizer, "_p5rec_grouped", False):
            return optimizer
        shared = (model or self.model).get_input_embeddings().weight
        if self.id_rows is not None and self.id_lr_multiplier != 1.0:
            scale_row_steps(optimizer, shared, self.id_rows.to(shared.device), self.id_lr_multiplier)
        if self.embedding_lr_multiplier == 1.0:
            optimizer._p5rec_grouped = True
            return optimizer
        for group in optimizer.param_groups:
            if any(p is shared for p in group["params"]):
                group["params"] = [p for p in group["params"] if p is not shared]
                settings = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group({**settings, "params": [shared],
                                           "lr": group["lr"] * self.embedding_lr_multiplier})
                break
        optimizer._p5rec_grouped = True
        return optimizer


def scale_row_steps(optimizer, weight: torch.nn.Parameter, rows: torch.Tensor, multiplier: float) -> None:
    """Make every optimizer step move ``weight[rows]`` ``multiplier`` times as far as the optimizer moved it.

    For Adam(W) that is the same as a learning rate ``multiplier`` times larger for those rows alone (its
    update is linear in the learning rate, weight decay included); a parameter group cannot hold part of a
    tensor, so the step is rescaled around it: the rows are read before the step and their change scaled
    after. The moments are the optimizer's own, so a resumed run continues exactly.
    """
    before = {}

    def pre(opt, args, kwargs):
        before["rows"] = weight.detach()[rows].clone()

    def post(opt, args, kwargs):
        old = before.pop("rows")
        with torch.no_grad():
            weight[rows] = old + multiplier * (weight[rows] - old)

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
