"""Trainer callbacks: the learning curve (a cheap per-family validation metric at every evaluation)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Which protocols a family's curve follows and which metric stands for it: its spec's ``curve:`` (the protocols are
# its headline ones, cheap enough to run at every evaluation; a family without ``curve:`` has no curve).


class LearningCurveCallback(TrainerCallback):
    """After each evaluation, score one seen template per family and curve protocol on ``n_users`` validation
    cases; with a sequence template trained, the sequential family is followed by both protocols.

    Writes ``learning_curve.json`` in the run directory: a list of {step, epoch, eval_loss, train_seconds,
    <family>: {template, metric...}, <family>/continuation: {...}}, and puts each point's curve metric into
    the Trainer's evaluation metrics as ``eval_<family>_<metric>`` (``eval_sequential_NDCG@10``,
    ``eval_sequential/continuation_NDCG@10``), so ``--metric_for_best_model`` with
    ``--load_best_model_at_end`` keeps the best checkpoint on it. Cheap by construction: single-token ids rank
    the catalogue in one decoder step, text is greedy and short.

    :class:`p5rec.train.trainer.P5Trainer` calls :meth:`measure` inside its evaluation loop, before the Trainer logs the
    evaluation, so the per-family metrics reach every ``--report_to`` integration (TensorBoard scalars
    ``eval/sequential_NDCG@10``, ...) and the ``log_history``; with another Trainer, ``on_evaluate`` measures.
    Every process measures (the numbers agree, so best-model selection agrees); only the main one writes.
    """

    def __init__(self, run_dir, prepared, tokenizer, templates, render_config, families, n_users=200,
                 max_source_length=128, trained=None):
        self.run_dir = Path(run_dir)
        self.prepared, self.tokenizer, self.templates = prepared, tokenizer, templates
        self.render_config, self.families, self.n_users = render_config, families, n_users
        self.max_source_length = max_source_length
        self.trained = trained  # template ids in the training mixture (None: every seen one)
        self.points: list[dict] = []
        self._tries = None
        self._started = None
        self._eval_seconds = 0.0
        self._measured_at: int | None = None  # the step whose point measure() has added and on_evaluate not yet saved

    def _curve(self, family: str):
        return self.templates.family_info(family).curve

    def _probe_templates(self) -> list[tuple[str, object]]:
        """(curve key, template): the first trained template of each family and curve protocol."""
        from p5rec.eval.evaluation import protocol_of

        chosen: dict[str, object] = {}
        for t in self.templates:
            if t.family not in self.families or not t.seen:
                continue
            if self.trained is not None and t.id not in self.trained:
                continue
            proto = protocol_of(t)
            curve = self._curve(t.family)
            wanted = curve.protocols if curve else ()
            if proto not in wanted:
                continue
            key = t.family if proto == wanted[0] else f"{t.family}/{proto}"
            chosen.setdefault(key, t)
        return list(chosen.items())

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run keeps the curve points up to its checkpoint and continues their training clock."""
        self._started = time.time()
        path = self.run_dir / "learning_curve.json"
        if state.global_step > 0 and path.exists() and not self.points:
            self.points = [p for p in json.loads(path.read_text()) if p.get("step", 0) <= state.global_step]
            done = [p["train_seconds"] for p in self.points if p.get("train_seconds") is not None]
            self._started -= done[-1] if done else 0.0

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.n_users <= 0:
            return
        if self._measured_at != state.global_step:
            self.measure(model, state, metrics)
        self._measured_at = None
        if state.is_world_process_zero:
            (self.run_dir / "learning_curve.json").write_text(json.dumps(self.points, indent=2))

    def measure(self, model, state, metrics: dict | None = None) -> dict:
        """Score the probe templates now; add the point to the curve and ``eval_<key>_<metric>`` to ``metrics``
        (and return those). The file is written by ``on_evaluate``."""
        if self.n_users <= 0:
            return {}
        from p5rec.eval.evaluation import EvalConfig, build_catalogue_trie, score_template

        if self._tries is None:
            self._tries = {"catalogue": build_catalogue_trie(self.prepared, self.tokenizer, self.render_config.id_form)}
        cfg = EvalConfig(split="valid", max_cases=self.n_users, max_candidate_cases=20, batch_size=64,
                         max_new_tokens=24, max_source_length=self.max_source_length, baselines=False, progress=False)
        t0 = time.time()
        elapsed = t0 - self._started if self._started else None
        point = {"step": state.global_step, "epoch": state.epoch, "eval_loss": (metrics or {}).get("eval_loss"),
                 "train_seconds": None if elapsed is None else round(elapsed - self._eval_seconds, 1)}
        was_training = model.training
        added = {}
        for key, t in self._probe_templates():
            r = score_template(model, self.tokenizer, self.prepared, t, cfg, self.render_config, self._tries,
                               self.templates.family_info(t.family).data, self.templates)
            metric = self._curve(t.family).metric
            point[key] = {"template": t.id, **{k: v for k, v in r.metrics.items()
                                                 if k in (metric, "HR@10", "MAE", "RMSE_expected")}}
            if metric in r.metrics:
                added[f"eval_{key}_{metric}"] = r.metrics[metric]
        if metrics is not None:
            metrics.update(added)
        point["seconds"] = round(time.time() - t0, 1)
        self._eval_seconds += time.time() - t0
        if was_training:
            model.train()
        self.points.append(point)
        self._measured_at = state.global_step
        logger.info("learning curve @%d: %s", state.global_step,
                    {f: point[f] for f in point if isinstance(point[f], dict)})
        return added
