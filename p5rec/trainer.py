"""The Trainer p5rec trains with: ``Seq2SeqTrainer`` plus a learning rate of its own for the shared embedding.

Why: HF's T5 multiplies the decoder output by d_model^-0.5 (tied embeddings) and does not scale the input
embedding, where SASRec multiplies the input by sqrt(d) and reads logits as h.E. The two are the same function
of a rescaled embedding, but Adam's steps are scale-free: relative to its size, a T5 embedding then moves
sqrt(d_model) times slower than SASRec's. ``embedding_lr_multiplier`` (with ``embedding_init_std``, in
p5rec.model) gives the embedding SASRec's dynamics without changing the architecture or the checkpoint format.
Measured in bench/README.md ("What makes the sequence objective learn").
"""

from __future__ import annotations

from transformers import Seq2SeqTrainer


class P5Trainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` whose optimizer gives the shared (tied) embedding ``embedding_lr_multiplier`` times
    the learning rate, in a parameter group of its own; the schedule scales every group alike. Resuming
    needs the same multiplier (the optimizer state is saved per group)."""

    def __init__(self, *args, embedding_lr_multiplier: float = 1.0, **kwargs):
        self.embedding_lr_multiplier = float(embedding_lr_multiplier)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.embedding_lr_multiplier == 1.0 or getattr(optimizer, "_p5rec_grouped", False):
            return optimizer
        shared = (model or self.model).get_input_embeddings().weight
        for group in optimizer.param_groups:
            if any(p is shared for p in group["params"]):
                group["params"] = [p for p in group["params"] if p is not shared]
                settings = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group({**settings, "params": [shared],
                                           "lr": group["lr"] * self.embedding_lr_multiplier})
                break
        optimizer._p5rec_grouped = True
        return optimizer
