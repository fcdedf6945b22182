"""Trainer callbacks: the learning curve (a cheap per-family validation metric at every evaluation)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Which metric stands for a family on the learning curve (one seen template each, on validation cases).
CURVE_METRIC = {"sequential": "NDCG@10", "direct": "NDCG@10", "rating": "RMSE", "explanation": "ROUGE-L",
                "review": "ROUGE-L"}


class LearningCurveCallback(TrainerCallback):
    """After each evaluation, score one seen template per family on ``n_users`` validation cases.

    Writes ``learning_curve.json`` in the run directory: a list of {step, epoch, eval_loss, <family>: {metric}}.
    Cheap by construction: single-token ids rank the catalogue in one decoder step, text is greedy and short.
    """

    def __init__(self, run_dir, prepared, tokenizer, templates, render_config, families, n_users=200,
                 max_source_length=128):
        self.run_dir = Path(run_dir)
        self.prepared, self.tokenizer, self.templates = prepared, tokenizer, templates
        self.render_config, self.families, self.n_users = render_config, families, n_users
        self.max_source_length = max_source_length
        self.points: list[dict] = []
        self._tries = None

    def _probe_templates(self):
        from p5rec.evaluation import target_kind

        chosen = {}
        for t in self.templates:
            if t.family in self.families and t.seen and t.family not in chosen:
                kind = target_kind(t)
                if (t.family in ("sequential", "direct") and kind == "item" and t.scoring == "generation") or \
                   (t.family in ("sequential", "direct") and t.scoring == "candidate_ranking" and t.family == "direct") or \
                   (t.family == "rating" and kind == "rating") or \
                   (t.family in ("explanation", "review") and kind == "text"):
                    chosen[t.family] = t
        return list(chosen.values())

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.n_users <= 0:
            return
        from p5rec.evaluation import EvalConfig, build_catalogue_trie, score_template

        if self._tries is None:
            self._tries = {"catalogue": build_catalogue_trie(self.prepared, self.tokenizer, self.render_config.id_form)}
        cfg = EvalConfig(split="valid", max_cases=self.n_users, max_candidate_cases=20, batch_size=64,
                         max_new_tokens=24, max_source_length=self.max_source_length, baselines=False, progress=False)
        t0 = time.time()
        point = {"step": state.global_step, "epoch": state.epoch,
                 "eval_loss": (metrics or {}).get("eval_loss")}
        was_training = model.training
        for t in self._probe_templates():
            r = score_template(model, self.tokenizer, self.prepared, t, cfg, self.render_config, self._tries,
                               self.templates.family_info(t.family).data, self.templates)
            key = CURVE_METRIC.get(t.family)
            point[t.family] = {"template": t.id, **{k: v for k, v in r.metrics.items() if k in (key, "HR@10", "MAE", "RMSE_expected")}}
        point["seconds"] = round(time.time() - t0, 1)
        if was_training:
            model.train()
        self.points.append(point)
        logger.info("learning curve @%d: %s", state.global_step,
                    {f: point[f] for f in point if isinstance(point[f], dict)})
        (self.run_dir / "learning_curve.json").write_text(json.dumps(self.points, indent=2))
