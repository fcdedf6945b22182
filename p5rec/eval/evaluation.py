"""Score a trained run per task family with that family's protocol; write results.json and results.md.

A partial evaluation (some families or templates, the valid split, a cap on cases) writes its own
``results-<split>-<hash>.json`` / ``.md`` beside them instead (:func:`results_path`).

How a template is scored follows from two facts about it: its ``scoring`` kind and what its target renders
(an item, a rating, free text, or one of its answer choices). See :func:`target_kind` and :func:`score_template`.

| kind of template | protocol | metrics |
|---|---|---|
| generation, item target | beam search restricted by a trie to the catalogue | HR@1/5/10, NDCG@5/10, MAP@10 |
| candidate_ranking / listwise | the same, restricted to the case's saved candidates | same |
| choice / pointwise over an item (yes/no) | rank the saved candidates by P(yes) - P(no) | same |
| pairwise | which of (target, one saved negative) the model picks | accuracy |
| generation, rating target | greedy, parsed, clipped (unparsable counted); expected star, raw, calibrated | RMSE, MAE |
| choice over a rating (like/dislike, k stars?) | argmax over answer choices | accuracy |
| generation, text target | greedy (beam optional) | BLEU-4 (BLEU-2 for summaries), ROUGE-1/2/L |

Baselines on the same split sit beside the model: popularity (sequential, direct), global mean and biased MF
(rating), nearest training text (explanation, review).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from p5rec import atomic

from p5rec.eval import baselines, decoding, metrics
from p5rec.prompts.families import DecodingSpec, FamilySpec, shipped_specs
from p5rec.train.routing import family_route

logger = logging.getLogger(__name__)

RANKING_KEYS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MAP@10")


def curve_metrics(specs: dict[str, FamilySpec] | None = None) -> dict[str, str]:
    """family -> the metric that stands for it on the learning curve (its spec's ``curve:``)."""
    specs = shipped_specs() if specs is None else specs
    return {f: spec.curve.metric for f, spec in specs.items() if spec.curve is not None}


@dataclass
class EvalConfig:
    split: str = "test"
    # every shipped family, in its spec's order; naming them all also scores a run's own (--template_files) ones
    families: tuple[str, ...] = field(default_factory=lambda: tuple(shipped_specs()))
    templates: tuple[str, ...] = ()  # template ids; empty: all
    max_cases: int = 0  # cases per template (users for ranking); 0: all
    max_candidate_cases: int = 200  # users for per-candidate (yes/no over 100 candidates) templates; 0: all
    batch_size: int = 64
    num_beams: int = 20
    # Text decoding, chosen on the MI main job's validation split (bench/README.md): 4 beams lift ROUGE-L over
    # greedy (explanation 9.1 -> 11.6, review 4.6 -> 6.8); no repeated trigram changed no validation score
    # but stops loops and shortens the beams' work.
    text_beams: int = 4
    text_no_repeat_ngram: int = 3  # generate()'s no_repeat_ngram_size for text (0: off)
    text_repetition_penalty: float = 1.0
    # Context-aware decoding of text (decoding.PromptContrast): each next token scored against a contrast prompt,
    # times text_contrast (0: off); text_plausibility keeps only the tokens within that factor of the best one
    # under the case's own prompt (0: all). The contrast prompt is the case's own prompt with the fields of
    # text_contrast_without left empty (a template using none of them is decoded plainly); with no such fields,
    # another case's prompt of the same template. None: the family's own (its spec's `decoding:`; families.py)
    text_contrast: float | None = None
    text_plausibility: float | None = None
    text_contrast_without: tuple[str, ...] | None = None
    # Text chosen among training texts (the family's ``decoding: choose``, a field such as item): None keeps the
    # family's own, "" writes every family's text token by token
    text_choose: str | None = None
    max_new_tokens: int = 32
    max_source_length: int | None = None  # None: the run's own (run_config.json data.max_source_length)
    exclude_history: bool = False
    seed: int = 42
    baselines: bool = True
    sasrec: bool = True  # SASRec beside the sequential family (trained on the run's training sequences)
    progress: bool = True  # a progress bar per template
    reliance_cases: int = 256  # cases per template for the prompt-reliance control (prompt_reliance); 0: skip it


@dataclass
class TemplateResult:
    template: str
    family: str
    seen: bool
    scoring: str
    kind: str
    metrics: dict[str, float]
    n: int
    invalid: int = 0
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)
    protocol: str = ""
    # rating templates scored on test: the line their expected star is calibrated with, fitted on validation
    # ({"intercept", "slope", "n"}); p5rec predict and /rating apply it (``calibrated``)
    calibration: dict | None = None
    # the expected stars behind the rating metrics, for the mean over templates (:func:`star_ensembles`); not
    # written to the report
    stars: dict | None = field(default=None, repr=False, compare=False)


def target_kind(template) -> str:
    """'item', 'pairwise', 'choice', 'rating' or 'text', from the template's scoring kind and target fields."""
    if template.scoring == "pairwise":
        return "pairwise"
    if template.scoring in ("candidate_ranking", "listwise") or template.answers_item:
        return "item"
    if template.scoring in ("choice", "pointwise") or template.answer_choices:
        return "choice"
    if "rating" in template.target_variables:
        return "rating"
    return "text"


def _records(prepared, table_name: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` seeded rows of a prepared table's split (all of them for ``n`` = 0), in table order."""
    table = prepared.family(table_name)[split]
    if n and len(table) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(table), size=n, replace=False))
        table = table.select(idx.tolist())
    return table.to_list()


def _render(template, records, prepared, render_config):
    from p5rec.prompts.templates import item_titles, render_records

    titles = item_titles(prepared) if template.needs_titles else None
    return render_records(template, records, prepared.index, render_config, titles=titles)


# ---------------------------------------------------------------------------------------------- protocols
@dataclass
class Scored:
    """What a protocol returns for one template."""

    metrics: dict[str, float]
    n: int
    invalid: int = 0
    examples: list[dict] = field(default_factory=list)
    calibration: dict | None = None
    # rating: {"expected", "gold"} on the split, "fit": (expected, gold) on validation (None on validation itself)
    stars: dict | None = None


@dataclass
class Context:
    """Everything a protocol may read; each protocol declares which of the optional parts it needs."""

    model: Any
    tokenizer: Any
    prepared: Any
    cfg: EvalConfig
    render_config: Any
    tries: dict  # {"catalogue": ItemTrie over every item}, built once per run
    table: str  # the prepared table the template's family reads (design.md §2)
    templates: Any = None  # the TemplateSet, for protocols that score the renderer's sampled rows

    @property
    def common(self) -> dict:
        return dict(batch_size=self.cfg.batch_size, max_source_length=self.cfg.max_source_length,
                    desc=self.desc)

    desc: str | None = None


@dataclass(frozen=True)
class Protocol:
    """A way to score a template. ``needs`` says what it reads besides the model (RecBole's ``metric_need``):
    ``records`` (split rows), ``saved candidates`` (the direct split's 100 per user), ``catalogue trie``,
    ``sampled rows`` (the renderer's seeded questions for the split)."""

    name: str
    score: Callable[[Context, Any], Scored]
    needs: frozenset[str]
    doc: str
    cases: str = "max_cases"  # the EvalConfig field that caps its cases; its baselines are scored on the same ones


PROTOCOLS: dict[str, Protocol] = {}


def register(name: str, needs: tuple[str, ...] = (), cases: str = "max_cases"):
    def wrap(fn):
        if name in PROTOCOLS:
            raise ValueError(f"protocol {name!r} registered twice")
        PROTOCOLS[name] = Protocol(name, fn, frozenset(needs), (fn.__doc__ or "").strip().split("\n")[0], cases)
        return fn

    return wrap


def protocol_of(template, templates=None) -> str:
    """The protocol that scores ``template``, decided once from its scoring kind and its target."""
    scoring = template.scoring
    if scoring == "sequence":
        return "continuation"
    if scoring in ("pairwise", "listwise"):
        return scoring
    if scoring == "candidate_ranking":
        return "candidates"
    kind = target_kind(template)
    if kind == "item":
        return "full ranking"
    if kind == "choice":
        return "yes/no over candidates" if _is_item_choice(template) else "choice accuracy"
    return kind  # rating, text


def score_template(model, tokenizer, prepared, template, cfg: EvalConfig, render_config, tries,
                   data_family: str | None = None, templates=None) -> TemplateResult:
    """Evaluate one template on ``cfg.split`` with its protocol (:func:`protocol_of`).

    ``data_family`` names the prepared table the template's family reads (the ranking family reads
    ``sequential``); by default the template's own family. ``tries`` caches the catalogue trie. Templates
    whose question is sampled per case (the star of "will U give k stars?", the pair of a pairwise prompt,
    the short list of a listwise one) are scored on the rows the renderer samples for the split
    (``render_split``, seeded), so the model is asked exactly what the protocol asks; ``templates`` (the
    TemplateSet) is needed for those.
    """
    t0 = time.time()
    name = protocol_of(template)
    ctx = Context(model, tokenizer, prepared, cfg, render_config, tries, data_family or template.family,
                  templates, desc=template.id if cfg.progress else None)
    with family_route(model, template.family):
        out = PROTOCOLS[name].score(ctx, template)
    return TemplateResult(
        template=template.id, family=template.family, seen=template.seen, scoring=template.scoring,
        kind=target_kind(template), metrics={k: float(v) for k, v in out.metrics.items()}, n=out.n,
        invalid=out.invalid, seconds=round(time.time() - t0, 2), examples=out.examples, protocol=name,
        calibration=out.calibration, stars=out.stars,
    )


def _ranking_examples(sources, records, ranked) -> list[dict]:
    return [{"source": s, "target": r["target"], "top": [i for i, _ in x[:5]]}
            for s, r, x in list(zip(sources, records, ranked))[:3]]


@register("full ranking", needs=("records", "catalogue trie"))
def _full_ranking(ctx: Context, t) -> Scored:
    """The target item among the whole catalogue: beam search restricted by the catalogue trie."""
    records = _records(ctx.prepared, ctx.table, ctx.cfg.split, ctx.cfg.max_cases, ctx.cfg.seed)
    sources = [s for s, _ in _render(t, records, ctx.prepared, ctx.render_config)]
    exclude = [r.get("history", []) for r in records] if ctx.cfg.exclude_history else None
    ranked = decoding.rank_items(ctx.model, ctx.tokenizer, sources, ctx.tries["catalogue"], k=20,
                                 num_beams=ctx.cfg.num_beams, exclude=exclude, **ctx.common)
    result = metrics.ranking_metrics([[i for i, _ in r] for r in ranked], [r["target"] for r in records])
    return Scored(result, len(records), examples=_ranking_examples(sources, records, ranked))


@register("continuation", needs=("records", "catalogue trie"))
def _continuation(ctx: Context, t) -> Scored:
    """The target item among the whole catalogue, ranked where the decoder continues the user's history
    (a ``sequence`` template: the prompt names the user, the decoder reads the history's item tokens)."""
    records = _records(ctx.prepared, ctx.table, ctx.cfg.split, ctx.cfg.max_cases, ctx.cfg.seed)
    sources = [s for s, _ in _render(t, [dict(r, target="") for r in records], ctx.prepared, ctx.render_config)]
    histories = [r["history"] for r in records]
    ranked = decoding.continue_items(
        ctx.model, ctx.tokenizer, sources, histories, ctx.tries["catalogue"], k=20, num_beams=ctx.cfg.num_beams,
        exclude=histories if ctx.cfg.exclude_history else None,
        max_items=max(ctx.render_config.max_sequence - 1, 0), **ctx.common)
    result = metrics.ranking_metrics([[i for i, _ in r] for r in ranked], [r["target"] for r in records])
    return Scored(result, len(records), examples=_ranking_examples(sources, records, ranked))


@register("candidates", needs=("records", "saved candidates", "catalogue trie"))
def _candidates(ctx: Context, t) -> Scored:
    """The target among the case's saved 100 candidates (1 positive + 99 never-touched), restricted decoding."""
    records = _records(ctx.prepared, ctx.table, ctx.cfg.split, ctx.cfg.max_cases, ctx.cfg.seed)
    records = _attach_candidates(ctx.prepared, ctx.cfg.split, records)
    sources = [s for s, _ in _render(t, records, ctx.prepared, ctx.render_config)]
    per = [ctx.tries["catalogue"].subset(r["candidates"]) for r in records]
    ranked = decoding.rank_items(ctx.model, ctx.tokenizer, sources, per, k=20, num_beams=ctx.cfg.num_beams,
                                 **ctx.common)
    result = metrics.ranking_metrics([[i for i, _ in r] for r in ranked], [r["target"] for r in records])
    return Scored(result, len(records), examples=_ranking_examples(sources, records, ranked))


@register("yes/no over candidates", needs=("records", "saved candidates"), cases="max_candidate_cases")
def _yes_no_over_candidates(ctx: Context, t) -> Scored:
    """One yes/no prompt per (case, saved candidate); candidates ranked by log P(yes) - log P(no)."""
    records = _records(ctx.prepared, ctx.table, ctx.cfg.split, ctx.cfg.max_candidate_cases, ctx.cfg.seed)
    records = _attach_candidates(ctx.prepared, ctx.cfg.split, records)
    flat, owner = [], []
    for ci, r in enumerate(records):
        for cand in r["candidates"]:
            flat.append(dict(r, item=cand, candidate=cand))
            owner.append(ci)
    rendered = _render(t, flat, ctx.prepared, ctx.render_config)
    yes, no = t.answer_choices[0], t.answer_choices[1]
    lp = decoding.choice_logprobs(ctx.model, ctx.tokenizer, [s for s, _ in rendered], [yes, no],
                                  batch_size=ctx.cfg.batch_size * 2, max_source_length=ctx.cfg.max_source_length,
                                  desc=ctx.desc)
    score = lp[:, 0] - lp[:, 1]
    owner = np.asarray(owner)
    ranked = []
    for ci, r in enumerate(records):
        order = np.argsort(-score[owner == ci], kind="stable")
        ranked.append([r["candidates"][j] for j in order])
    return Scored(metrics.ranking_metrics(ranked, [r["target"] for r in records]), len(records))


@register("listwise", needs=("sampled rows", "catalogue trie"))
def _listwise(ctx: Context, t) -> Scored:
    """The target among a short sampled list (the renderer's seeded lists), restricted decoding."""
    rows = _sampled_rows(ctx.prepared, t, ctx.cfg, ctx.render_config, ctx.templates)
    per = [ctx.tries["catalogue"].subset(c) for c in rows["candidates"]]
    ranked = decoding.rank_items(ctx.model, ctx.tokenizer, rows["source"], per, k=len(rows["candidates"][0]),
                                 num_beams=ctx.cfg.num_beams, **ctx.common)
    result = metrics.ranking_metrics([[i for i, _ in r] for r in ranked], rows["answer"], ks=(1, 3, 5))
    return Scored(result, len(rows["source"]))


@register("pairwise", needs=("sampled rows", "catalogue trie"))
def _pairwise(ctx: Context, t) -> Scored:
    """Which of (target, one saved negative) the model picks: the item it ranks first, or its answer choice."""
    if not t.answers_item:
        return _choice_accuracy(ctx, t)
    rows = _sampled_rows(ctx.prepared, t, ctx.cfg, ctx.render_config, ctx.templates)
    per = [ctx.tries["catalogue"].subset(c) for c in rows["candidates"]]
    ranked = decoding.rank_items(ctx.model, ctx.tokenizer, rows["source"], per, k=1, num_beams=2, **ctx.common)
    preds = [r[0][0] if r else "" for r in ranked]
    return Scored({"accuracy": float(np.mean([p == a for p, a in zip(preds, rows["answer"])]))},
                  len(rows["source"]))


@register("choice accuracy", needs=("sampled rows",))
def _choice_accuracy(ctx: Context, t) -> Scored:
    """Argmax over the template's answer choices (full-sequence log-likelihood of each)."""
    rows = _sampled_rows(ctx.prepared, t, ctx.cfg, ctx.render_config, ctx.templates)
    sources, golds = rows["source"], rows["target"]
    choices = list(t.answer_choices or ["A", "B"])
    lp = decoding.choice_logprobs(ctx.model, ctx.tokenizer, sources, choices, batch_size=ctx.cfg.batch_size,
                                  max_source_length=ctx.cfg.max_source_length, desc=ctx.desc)
    preds = [choices[j] for j in lp.argmax(1)]
    examples = [{"source": s, "target": g, "output": p} for s, g, p in list(zip(sources, golds, preds))[:3]]
    return Scored({"accuracy": metrics.accuracy(preds, golds)}, len(sources), examples=examples)


def text_decoding_of(family: str, templates, cfg: EvalConfig | None = None) -> DecodingSpec:
    """The context-aware decoding of ``family``'s text: its spec's ``decoding:`` (none for a family the template
    set does not declare), each part overridden where ``cfg`` sets it."""
    spec = DecodingSpec()
    if templates is not None:
        try:
            spec = templates.family_info(family).decoding
        except KeyError:
            pass
    if cfg is None:
        return spec
    return replace(spec, contrast=spec.contrast if cfg.text_contrast is None else float(cfg.text_contrast),
                   without=spec.without if cfg.text_contrast_without is None else tuple(cfg.text_contrast_without),
                   plausibility=spec.plausibility if cfg.text_plausibility is None else float(cfg.text_plausibility),
                   choose=spec.choose if cfg.text_choose is None else cfg.text_choose)


@dataclass
class TextPool:
    """The training texts a family's ``decoding: choose`` picks among (:class:`DecodingSpec`).

    ``by_key``: the ``choose`` field's value (an item) -> its distinct training texts, ordered by a checksum of
    the text, so the first ``size`` are a fixed draw that owes nothing to the texts' content, frequency or the
    case; ``by_hint``: hint field -> lower-cased value -> its training texts, most common first; ``common``: the
    most common training texts, for a case whose value has none."""

    key: str
    size: int
    by_key: dict[str, list[str]]
    by_hint: dict[str, dict[str, list[str]]]
    common: list[str]

    @classmethod
    def from_rows(cls, rows: dict[str, list], target: str, spec: DecodingSpec) -> "TextPool":
        """From the training table's columns (``rows[field]``); ``target``: the column the texts are."""
        import zlib
        from collections import Counter

        for name in (target, spec.choose, *spec.hints):
            if name not in rows:
                raise ValueError(f"decoding: choose needs the training column {name!r} (columns: "
                                 f"{', '.join(rows)})")
        texts = [str(t) for t in rows[target]]
        keyed: dict[str, set[str]] = {}
        for k, t in zip(rows[spec.choose], texts):
            if t.strip():
                keyed.setdefault(str(k), set()).add(t)
        by_key = {k: sorted(v, key=lambda t: (zlib.crc32(t.encode("utf-8")), t)) for k, v in keyed.items()}
        by_hint: dict[str, dict[str, list[str]]] = {}
        for h in spec.hints:
            counts: dict[str, Counter] = {}
            for v, t in zip(rows[h], texts):
                if t.strip() and str(v or "").strip():
                    counts.setdefault(str(v).strip().lower(), Counter())[t] += 1
            by_hint[h] = {v: [t for t, _ in c.most_common(spec.candidates)] for v, c in counts.items()}
        common = [t for t, _ in Counter(t for t in texts if t.strip()).most_common(spec.candidates)]
        return cls(spec.choose, spec.candidates, by_key, by_hint, common)

    def candidates(self, record: dict, hints: tuple[str, ...] = ()) -> list[str]:
        """The texts ``record`` is answered among: its key's (``common`` when it has none), narrowed by each shown
        hint to those mentioning the hint's value (when none does: the hint's own most common texts)."""
        texts = self.by_key.get(str(record.get(self.key)), [])
        for h in hints:
            value = str(record.get(h) or "").strip().lower()
            if value:
                texts = ([t for t in texts if value in t.lower()] or self.by_hint.get(h, {}).get(value, [])
                         or texts)
        return texts[: self.size] or self.common


def text_pool(prepared, table: str, template, spec: DecodingSpec) -> TextPool:
    """The :class:`TextPool` of ``template``'s target over the training split of the prepared ``table``."""
    target = next(iter(sorted(template.target_variables)))
    train = prepared.family(table)["train"]
    names = [n for n in dict.fromkeys((target, spec.choose, *spec.hints)) if n in train.column_names]
    return TextPool.from_rows(train.select_columns(names)[:] if names else {}, target, spec)


def shown_hints(spec: DecodingSpec, template) -> tuple[str, ...]:
    """The ``spec.hints`` fields ``template``'s prompt shows."""
    return tuple(h for h in spec.hints if h in template.variables - template.target_variables)


def choose_for(model, tokenizer, pool: TextPool, spec: DecodingSpec, template, sources: list[str],
               records: list[dict], **kw) -> list[str]:
    """Each record's text chosen among its :class:`TextPool` candidates under ``template``'s prompt (``sources``,
    rendered from ``records``): evaluation and ``P5Rec`` both answer through it."""
    hints = shown_hints(spec, template)
    return decoding.choose_texts(model, tokenizer, sources, [pool.candidates(r, hints) for r in records],
                                 length_penalty=spec.length_penalty, **kw)


def text_contrast(spec: DecodingSpec, template, records: list[dict], render) -> dict:
    """``decoding.generate_text``'s contrast settings for ``template``'s prompts of ``records``: the contrast
    prompts are ``render(records)`` with the fields of ``spec.without`` that the template shows left empty; {} when
    it shows none of them (or the contrast is 0). Evaluation and ``P5Rec`` both decode through it, so the text
    a user is served is the text that was scored."""
    blank = [f for f in spec.without if f in template.variables - template.target_variables]
    if not spec.contrast or not blank:
        return {}
    emptied = [{**r, **{f: "" for f in blank}} for r in records]
    return dict(contrast=spec.contrast, plausibility=spec.plausibility, contrast_sources=render(emptied))


def _generate(ctx: Context, t, text: bool = True):
    """Decode ``t``'s prompts on the split: the text settings of ``ctx.cfg`` for text, greedy otherwise."""
    records = _records(ctx.prepared, ctx.table, ctx.cfg.split, ctx.cfg.max_cases, ctx.cfg.seed)
    rendered = _render(t, records, ctx.prepared, ctx.render_config)
    sources, golds = [s for s, _ in rendered], [g for _, g in rendered]
    settings = dict(num_beams=ctx.cfg.text_beams, no_repeat_ngram_size=ctx.cfg.text_no_repeat_ngram,
                    repetition_penalty=ctx.cfg.text_repetition_penalty) if text else {}
    spec = text_decoding_of(t.family, ctx.templates, ctx.cfg) if text else DecodingSpec()
    if spec.choose:
        outputs = choose_for(ctx.model, ctx.tokenizer, text_pool(ctx.prepared, ctx.table, t, spec), spec, t,
                             sources, records, batch_size=ctx.cfg.batch_size,
                             max_source_length=ctx.cfg.max_source_length)
        examples = [{"source": s, "target": g, "output": o} for s, g, o in list(zip(sources, golds, outputs))[:3]]
        return sources, golds, outputs, examples
    if spec.contrast and spec.without:
        settings.update(text_contrast(spec, t, records, lambda rs: [s for s, _ in _render(t, rs, ctx.prepared,
                                                                                        ctx.render_config)]))
    elif spec.contrast and len(sources) > 1:  # no field to leave out: another case's prompt
        other = decoding.derangement(len(sources), ctx.cfg.seed)
        settings.update(contrast=spec.contrast, contrast_sources=[sources[i] for i in other],
                        plausibility=spec.plausibility)
    outputs = decoding.generate_text(ctx.model, ctx.tokenizer, sources, max_new_tokens=ctx.cfg.max_new_tokens,
                                     **settings, **ctx.common)
    examples = [{"source": s, "target": g, "output": o} for s, g, o in list(zip(sources, golds, outputs))[:3]]
    return sources, golds, outputs, examples


@register("rating", needs=("records",))
def _rating(ctx: Context, t) -> Scored:
    """Greedy output parsed and clipped to [1, 5] (P5's protocol; unparsable outputs counted); beside it the
    expected star under the model's distribution over "1".."5" (the estimate that minimises squared error), and
    that expected star calibrated on validation (:func:`calibrate_stars`)."""
    sources, golds, outputs, examples = _generate(ctx, t, text=False)
    fallback = baselines.global_mean_rating(ctx.prepared.family(ctx.table)["train"]["rating"])
    y = np.array([float(g) for g in golds])
    result = metrics.rating_metrics(outputs, y.tolist(), fallback=fallback)
    expected = _expected_stars(ctx, sources)
    exp_m = metrics.rating_metrics(expected.tolist(), y.tolist(), fallback=fallback)
    result["RMSE_expected"], result["MAE_expected"] = exp_m["RMSE"], exp_m["MAE"]
    if ctx.cfg.split == "valid":
        calibrated, line, fit = cross_calibrated(expected, y), None, None
    else:
        records = _records(ctx.prepared, ctx.table, "valid", ctx.cfg.max_cases, ctx.cfg.seed)
        rendered = _render(t, records, ctx.prepared, ctx.render_config)
        fit = (_expected_stars(ctx, [s for s, _ in rendered]), np.array([float(g) for _, g in rendered]))
        intercept, slope = calibration_line(*fit)
        calibrated = apply_calibration(expected, intercept, slope)
        line = {"intercept": intercept, "slope": slope, "n": len(fit[1])}
    cal_m = metrics.rating_metrics(calibrated.tolist(), y.tolist(), fallback=fallback)
    result["RMSE_calibrated"], result["MAE_calibrated"] = cal_m["RMSE"], cal_m["MAE"]
    return Scored(result, len(sources), invalid=int(result.get("invalid", 0)), examples=examples,
                  calibration=line, stars={"expected": expected, "gold": y, "fit": fit})


def cross_calibrated(expected: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Expected stars calibrated on the same split without scoring a case with a line fitted on it: each half of
    the cases (alternate ones) on the line fitted to the other half."""
    half = np.arange(len(gold)) % 2 == 0
    calibrated = np.empty_like(expected)
    for fit, score in ((half, ~half), (~half, half)):
        calibrated[score] = calibrate_stars(expected[fit], gold[fit])(expected[score])
    return calibrated


ENSEMBLE_METRICS = ("RMSE_ensemble", "MAE_ensemble", "RMSE_ensemble_calibrated", "MAE_ensemble_calibrated")


def star_ensembles(results: list[TemplateResult], specs: dict[str, FamilySpec]) -> dict:
    """Per family whose rating protocol declares ``RMSE_ensemble`` (its templates.yaml): the expected star
    averaged over its seen rating templates, scored on their common cases, raw and calibrated on validation as each
    template is (on the validation split itself, by halves: :func:`cross_calibrated`). One model asked the same
    question in several wordings: the mean of its answers (prompt ensembling) cancels part of what each wording
    adds. {family: {metric: value, "templates": [ids], "n": cases, "calibration": the line fitted on validation
    ({"intercept", "slope", "n"}; None on validation itself)}}; a family with fewer than two such templates, or
    whose templates scored different cases, gets none. P5Rec serves it (``expected_mean``, ``calibrated_mean``)."""
    out: dict[str, dict] = {}
    for fam, spec in specs.items():
        declared = spec.protocols.get("rating")
        if declared is None or "RMSE_ensemble" not in declared.metrics:
            continue
        rs = [r for r in results if r.family == fam and r.seen and r.protocol == "rating" and r.stars is not None]
        if len(rs) < 2:
            continue
        gold = rs[0].stars["gold"]
        if any(len(r.stars["gold"]) != len(gold) or not np.array_equal(r.stars["gold"], gold) for r in rs):
            logger.warning("%s: its rating templates scored different cases; no mean over templates", fam)
            continue
        expected = np.mean([r.stars["expected"] for r in rs], axis=0)
        fits = [r.stars["fit"] for r in rs]
        line = None
        if all(f is not None for f in fits):
            intercept, slope = calibration_line(np.mean([f[0] for f in fits], axis=0), fits[0][1])
            calibrated = apply_calibration(expected, intercept, slope)
            line = {"intercept": intercept, "slope": slope, "n": len(fits[0][1])}
        else:
            calibrated = cross_calibrated(expected, gold)
        raw, cal = (metrics.rating_metrics(e.tolist(), gold.tolist()) for e in (expected, calibrated))
        out[fam] = {"RMSE_ensemble": raw["RMSE"], "MAE_ensemble": raw["MAE"],
                    "RMSE_ensemble_calibrated": cal["RMSE"], "MAE_ensemble_calibrated": cal["MAE"],
                    "templates": [r.template for r in rs], "n": len(gold), "calibration": line}
    return out


def _expected_stars(ctx: Context, sources: list[str]) -> np.ndarray:
    return expected_stars(ctx.model, ctx.tokenizer, sources, batch_size=ctx.cfg.batch_size,
                          max_source_length=ctx.cfg.max_source_length)


def expected_stars(model, tokenizer, sources: list[str], batch_size: int = 128,
                   max_source_length: int = 128) -> np.ndarray:
    """The expected star under the model's distribution over the answers "1".."5" for each prompt."""
    if not sources:
        return np.zeros(0)
    lp = decoding.choice_logprobs(model, tokenizer, sources, ["1", "2", "3", "4", "5"], batch_size=batch_size,
                                  max_source_length=max_source_length)
    p = np.exp(lp - lp.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)) @ np.arange(1, 6)


def calibrate_stars(expected: np.ndarray, gold: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The least-squares line ``a + b * expected`` through held-out (expected star, true star) pairs, its slope
    kept at or above 0 (a slope of 0 predicts their mean star), clipped to [1, 5] where applied.

    An overconfident model (ids that memorised their training stars) spreads its expected stars too far; the
    fitted slope below 1 pulls them back towards the mean, as temperature scaling does for probabilities. With no
    pairs the line is the identity."""
    intercept, slope = calibration_line(expected, gold)
    return lambda e: apply_calibration(e, intercept, slope)


def calibration_line(expected, gold) -> tuple[float, float]:
    """(intercept, slope) of :func:`calibrate_stars`'s line; (0, 1), the identity, with no pairs."""
    expected, gold = np.asarray(expected, float), np.asarray(gold, float)
    if len(gold) == 0:
        return 0.0, 1.0
    var = float(((expected - expected.mean()) ** 2).mean())
    slope = max(0.0, float(((expected - expected.mean()) * (gold - gold.mean())).mean()) / var) if var > 0 else 0.0
    return float(gold.mean()) - slope * float(expected.mean()), slope


def apply_calibration(expected, intercept: float, slope: float) -> np.ndarray:
    """``intercept + slope * expected``, clipped to the stars [1, 5]."""
    return np.clip(intercept + slope * np.asarray(expected, float), 1.0, 5.0)


@register("text", needs=("records",))
def _text(ctx: Context, t) -> Scored:
    """Beam-searched text (``EvalConfig.text_*``): BLEU-n as the family declares it (BLEU-4; BLEU-2 for review
    summaries), ROUGE-1/2/L, distinct-1/2."""
    sources, golds, outputs, examples = _generate(ctx, t)
    orders = bleu_orders(_spec_of(t.family, ctx.templates), "text")
    return Scored(metrics.text_metrics(outputs, golds, bleu_orders=orders), len(sources), examples=examples)


def _sampled_rows(prepared, template, cfg: EvalConfig, render_config, templates) -> dict:
    """The renderer's own rows for ``template`` on the split (seeded), capped at ``cfg.max_cases``."""
    from p5rec.prompts.templates import render_split

    if templates is None:
        raise ValueError(f"template {template.id} needs the TemplateSet to sample its questions")
    config = replace(render_config, template_ids=[template.id], include_unseen=True, seed=cfg.seed)
    ds = render_split(prepared, template.family, cfg.split, config, templates)
    if cfg.max_cases and len(ds) > cfg.max_cases:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(ds), size=cfg.max_cases, replace=False))
        ds = ds.select(idx.tolist())
    return ds.select_columns(["source", "target", "answer", "candidates"])[:]


# ----------------------------------------------------------------------------- does the model read its prompt?
PROMPT_READ_FLOOR = 0.01  # nats per answer token: a family whose seen templates gain less answers from the words


def prompt_reliance(model, tokenizer, prepared, chosen, cfg: EvalConfig, render_config, templates,
                    trained: set[str] | None = None) -> dict:
    """A control beside the metrics: does the model read what the prompt says about the case?

    For each template, up to ``cfg.reliance_cases`` rendered cases of ``cfg.split`` (the renderer's own rows,
    seeded) are scored by teacher forcing twice: the answer under its own prompt, and under the prompt of another
    case of the same template (a seeded derangement: no case keeps its own); each prompt is encoded once and
    decodes two answers, its own and the one moved to it. The template's words are the same in both; only the
    user, item, history, candidates or hint differ. ``gain`` = log-loss under another case's prompt
    minus under its own, in nats per answer token. A model that answers from the template's words alone (the
    marginal distribution of answers) has a gain near 0, however its ranking metrics compare with popularity:
    such a row measures the marginal, not personalization.

    Returns {"templates": {id: {family, seen, n, nll, nll_other_prompt, gain}}, "families": {family: {seen,
    unseen}: mean gain over those templates}}.
    """
    from p5rec.prompts.templates import render_split

    per: dict[str, dict] = {}
    rng = np.random.default_rng(cfg.seed)
    by_family: dict[str, list[str]] = {}
    for t in chosen:
        by_family.setdefault(t.family, []).append(t.id)
    seen_of = {t.id: (t.id in trained) if trained is not None else t.seen for t in chosen}
    for fam, ids in by_family.items():
        config = replace(render_config, template_ids=ids, include_unseen=True, seed=cfg.seed)
        rows = render_split(prepared, fam, cfg.split, config, templates).select_columns(
            ["source", "target", "template"])[:]
        which = np.asarray(rows["template"])
        for tid in ids:
            idx = np.flatnonzero(which == tid)
            if cfg.reliance_cases and len(idx) > cfg.reliance_cases:
                idx = np.sort(rng.choice(idx, size=cfg.reliance_cases, replace=False))
            if len(idx) < 2:
                continue
            src = [rows["source"][i] for i in idx]
            tgt = [rows["target"][i] for i in idx]
            other = decoding.derangement(len(idx), rng)  # case c's answer is also scored under prompt other[c]
            moved_to = np.empty_like(other)
            moved_to[other] = np.arange(len(other))  # prompt p also scores the answer of case moved_to[p]
            with family_route(model, fam):  # each prompt encoded once, for its own answer and the moved one
                scored = decoding.candidate_logprobs(
                    model, tokenizer, src, [[tgt[p], tgt[moved_to[p]]] for p in range(len(src))],
                    batch_size=cfg.batch_size, max_source_length=cfg.max_source_length or 256)
            own = np.array([lp[0] for lp, _ in scored])
            moved = np.array([lp[1] for lp, _ in scored])
            count = np.array([n[0] for _, n in scored])
            tokens = max(int(count.sum()), 1)
            nll, nll_other = -own.sum() / tokens, -moved.sum() / tokens
            per[tid] = {"family": fam, "seen": seen_of[tid], "n": len(idx), "nll": float(nll),
                        "nll_other_prompt": float(nll_other), "gain": float(nll_other - nll)}
    families: dict[str, dict] = {}
    for r in per.values():
        families.setdefault(r["family"], {"seen": [], "unseen": []})["seen" if r["seen"] else "unseen"].append(r)
    summary = {}
    for fam, groups in families.items():
        summary[fam] = {g: ({"gain": float(np.mean([r["gain"] for r in rs])),
                             "nll": float(np.mean([r["nll"] for r in rs])),
                             "nll_other_prompt": float(np.mean([r["nll_other_prompt"] for r in rs])),
                             "templates": len(rs)} if rs else None) for g, rs in groups.items()}
    return {"templates": per, "families": summary}


def unread_families(report: dict) -> list[tuple[str, float]]:
    """(family, mean gain over its seen templates) of every family below :data:`PROMPT_READ_FLOOR`."""
    fams = (report.get("prompt_reliance") or {}).get("families", {})
    return [(f, g["seen"]["gain"]) for f, g in fams.items() if g.get("seen") and g["seen"]["gain"] < PROMPT_READ_FLOOR]


def _is_item_choice(template) -> bool:
    """A yes/no template whose question is about one item, answered by comparing it with the record's target item
    (scored by ranking candidates by P(yes)); a yes/no about a star or a liking names no target."""
    return "item" in template.variables and "target" in template.variables


def _spec_of(family: str, templates=None) -> FamilySpec | None:
    """The family's spec: from the run's TemplateSet when given (a family of --template_files), else shipped."""
    if templates is not None and family in templates.families:
        return templates.family_info(family)
    return shipped_specs().get(family)


def bleu_orders(spec: FamilySpec | None, protocol_name: str) -> tuple[int, ...]:
    """The n of each ``BLEU-n`` the family reports under ``protocol_name``; (4,) when it declares none."""
    declared = spec.protocols.get(protocol_name) if spec else None
    orders = tuple(int(m[5:]) for m in (declared.metrics if declared else ()) if m[:5] == "BLEU-" and m[5:].isdigit())
    return orders or (4,)


def _attach_candidates(prepared, split: str, records: list[dict]) -> list[dict]:
    """Give each case its saved candidates (1 positive + 99 never-touched items for that user)."""
    if records and "candidates" in records[0]:
        return records
    by_user = prepared.saved_candidates(split)
    return [dict(r, candidates=by_user[r["user"]]) for r in records if r["user"] in by_user]


def build_catalogue_trie(prepared, tokenizer, id_form: str):
    from p5rec.eval.decoding import ItemTrie

    index = prepared.index
    return ItemTrie.from_surfaces(tokenizer, {raw: index.item_text(raw, id_form) for raw in index.items})


def protocol(r) -> str:
    """The protocol a template result was scored under (stored with it); means are only taken within one."""
    if isinstance(r, TemplateResult):
        return r.protocol
    if r.get("protocol"):
        return r["protocol"]
    # results written before the protocol was stored
    if r["kind"] == "item":
        return "candidates" if r["scoring"] in ("candidate_ranking", "listwise") else "full ranking"
    if r["kind"] == "choice":
        return "yes/no over candidates" if "HR@10" in r["metrics"] else "choice accuracy"
    return r["kind"]


def aggregate(results: list[TemplateResult]) -> dict:
    """Per family and protocol: the mean of each metric over seen and over unseen templates."""
    out: dict[str, dict] = {}
    for r in results:
        out.setdefault(r.family, {}).setdefault(protocol(r), {"seen": [], "unseen": []})[
            "seen" if r.seen else "unseen"].append(r)
    for fam, protos in out.items():
        for proto, groups in protos.items():
            for group, rs in groups.items():
                keys = sorted({k for x in rs for k in x.metrics if k not in ("n", "invalid")})
                groups[group] = {k: float(np.mean([x.metrics[k] for x in rs if k in x.metrics])) for k in keys}
    return out


@dataclass
class BaselineContext:
    """What a baseline method reads: the family's table (its spec's ``data:``), the split it is scored on, the
    protocol it sits beside (for BLEU orders) and the arguments its spec declares (``field``, ``input``)."""

    prepared: Any
    cfg: EvalConfig
    spec: FamilySpec
    protocol: str
    name: str
    args: dict

    @property
    def table(self):
        return self.prepared.family(self.spec.data)

    def records(self) -> list[dict]:
        """The cases the protocol scores the model on (the same seeded rows, under the same cap)."""
        cap = getattr(self.cfg, PROTOCOLS[self.protocol].cases) if self.protocol in PROTOCOLS else self.cfg.max_cases
        return _records(self.prepared, self.spec.data, self.cfg.split, cap, self.cfg.seed)

    def arg(self, key: str) -> str:
        if key not in self.args:
            raise ValueError(f"{self.spec.file}: baselines.{self.name}: method {self.method!r} needs {key!r} "
                             f"(the column it {'reads' if key in ('input', 'key') else 'predicts'})")
        return self.args[key]

    @property
    def method(self) -> str:
        return self.spec.baseline(self.name).method

    def text_scores(self, preds: list[str], golds: list[str]) -> dict:
        return metrics.text_metrics(preds, golds, bleu_orders=bleu_orders(self.spec, self.protocol))


# method -> fn(ctx) -> {baseline name: metrics}; a family's spec names them (tasks/<family>/templates.yaml)
BASELINES: dict[str, Callable[[BaselineContext], dict]] = {}


def baseline(method: str):
    def wrap(fn):
        if method in BASELINES:
            raise ValueError(f"baseline method {method!r} registered twice")
        BASELINES[method] = fn
        return fn

    return wrap


@baseline("popularity")
def _popularity(ctx: BaselineContext) -> dict:
    """Training-set popularity: over each case's saved candidates where the family ranks candidates, else over
    the catalogue (also with each user's history excluded, SASRec's protocol)."""
    counts = ctx.prepared.train_item_counts()
    rows = ctx.records()
    if "candidates" in ctx.table[ctx.cfg.split].column_names:
        rows = _attach_candidates(ctx.prepared, ctx.cfg.split, rows)
        ranked = baselines.popularity_direct({"candidates": [r["candidates"] for r in rows]}, counts)
        return {ctx.name: metrics.ranking_metrics(ranked, [r["target"] for r in rows])}
    targets = [r["target"] for r in rows]
    train_items = [i for seq in ctx.prepared.training_sequences().values() for i in seq]
    return {
        ctx.name: metrics.ranking_metrics(baselines.popularity_ranking(train_items, k=20, n_users=len(rows)), targets),
        f"{ctx.name} (history excluded)": metrics.ranking_metrics(
            baselines.popularity_ranking(train_items, k=20, exclude=[r["history"] for r in rows]), targets),
    }


@baseline("SASRec")
def _sasrec(ctx: BaselineContext) -> dict:
    """p5rec's SASRec trained on the training sequences (``--no-sasrec`` skips it)."""
    return {ctx.name: _sasrec_baseline(ctx.table, ctx.records(), ctx.cfg)} if ctx.cfg.sasrec else {}


def _ratings(ctx: BaselineContext) -> tuple:
    col = ctx.args.get("field", "rating")
    return ctx.table["train"], ctx.table[ctx.cfg.split], col


@baseline("global mean")
def _global_mean(ctx: BaselineContext) -> dict:
    """The training mean of the rating column (``field``, default ``rating``) for every case."""
    tr, te, col = _ratings(ctx)
    mu = baselines.global_mean_rating(tr[col])
    return {ctx.name: metrics.rating_metrics([mu] * len(te), te[col])}


@baseline("biased MF")
def _biased_mf(ctx: BaselineContext) -> dict:
    """``mu + b_u + b_i`` fitted on the training ratings."""
    tr, te, col = _ratings(ctx)
    mf = baselines.BiasedMF().fit(tr["user"], tr["item"], tr[col])
    return {ctx.name: metrics.rating_metrics(list(mf.predict(te["user"], te["item"])), te[col])}


@baseline("nearest training text")
def _nearest_text(ctx: BaselineContext) -> dict:
    """The ``field`` text of the training row of the same item closest to what the user writes."""
    col = ctx.arg("field")
    preds = baselines.nearest_review_baseline(ctx.table["train"], ctx.table[ctx.cfg.split], col)
    return {ctx.name: ctx.text_scores(preds, ctx.table[ctx.cfg.split][col])}


@baseline("text of nearest input")
def _nearest_input(ctx: BaselineContext) -> dict:
    """The ``field`` text of the training row whose ``input`` text is closest to the case's ``input``."""
    col, src = ctx.arg("field"), ctx.arg("input")
    preds = baselines.nearest_text_by_input(ctx.table["train"], ctx.table[ctx.cfg.split], src, col)
    return {ctx.name: ctx.text_scores(preds, ctx.table[ctx.cfg.split][col])}


@baseline("most common training text")
def _most_common(ctx: BaselineContext) -> dict:
    """One sentence for every case (the most common training ``field`` text): what ignoring the input reaches."""
    col = ctx.arg("field")
    golds = ctx.table[ctx.cfg.split][col]
    return {ctx.name: ctx.text_scores(baselines.most_common_text(ctx.table["train"][col], len(golds)), golds)}


@baseline("best constant training text")
def _best_constant(ctx: BaselineContext) -> dict:
    """One sentence for every case, chosen on the training split: of the most frequent training ``field`` texts,
    the one with the highest mean ROUGE-L against the training texts. A text row below it is beaten by a model
    that ignores its input."""
    col = ctx.arg("field")
    golds = ctx.table[ctx.cfg.split][col]
    sentence, _ = baselines.best_constant_text(ctx.table["train"][col], seed=ctx.cfg.seed)
    return {ctx.name: {**ctx.text_scores([sentence] * len(golds), golds), "sentence": sentence}}


@baseline("most common training text by key")
def _most_common_by(ctx: BaselineContext) -> dict:
    """Per case, the most common training ``field`` text among the training rows with the case's ``key`` (the
    feature word a hint template names): what writing the hint into a stock sentence reaches."""
    col, key = ctx.arg("field"), ctx.arg("key")
    tr, te = ctx.table["train"], ctx.table[ctx.cfg.split]
    for name, table in (("training", tr), (ctx.cfg.split, te)):
        if key not in table.column_names:
            raise ValueError(f"{ctx.spec.file}: baselines.{ctx.name}: the {name} table has no column {key!r} "
                             f"(columns: {', '.join(table.column_names)})")
    preds = baselines.most_common_text_by(tr[key], tr[col], te[key])
    return {ctx.name: ctx.text_scores(preds, te[col])}


@baseline("most typical training text by key")
def _most_typical_by(ctx: BaselineContext) -> dict:
    """Per case, among the training ``field`` texts of the case's ``key`` that the family's ``decoding: choose``
    answers a template without hints from (the same :class:`TextPool`), the one closest to the others (their
    ROUGE-L medoid): the same choice made without reading the prompt, so a chosen text is measured against it."""
    col, key = ctx.arg("field"), ctx.arg("key")
    own = ctx.spec.decoding
    spec = replace(own, hints=()) if own.choose == key else DecodingSpec(choose=key)
    tr, te = ctx.table["train"], ctx.table[ctx.cfg.split]
    for name, table in (("training", tr), (ctx.cfg.split, te)):
        if key not in table.column_names or col not in table.column_names:
            raise ValueError(f"{ctx.spec.file}: baselines.{ctx.name}: the {name} table needs columns {key!r} and "
                             f"{col!r} (columns: {', '.join(table.column_names)})")
    pool = TextPool.from_rows(tr.select_columns(list(dict.fromkeys([col, key])))[:], col, spec)
    typical: dict[str, str] = {}
    preds = []
    for value in te[key]:
        if value not in typical:
            typical[value] = baselines.most_typical_text(pool.candidates({key: value}))
        preds.append(typical[value])
    return {ctx.name: ctx.text_scores(preds, te[col])}


def run_baselines(prepared, cfg: EvalConfig, specs: dict[str, FamilySpec] | None = None) -> dict:
    """Every baseline the evaluated families' specs declare, scored on the same split and cases as the model:
    family -> baseline name -> metrics. A family whose table was not prepared gets none."""
    specs = shipped_specs() if specs is None else specs
    out: dict[str, dict] = {}
    for fam in cfg.families:
        spec = specs.get(fam)
        if spec is None or not prepared.has_family(spec.data):
            continue
        for proto, pspec in spec.protocols.items():
            for name in pspec.baselines:
                if name in out.get(fam, {}):
                    continue
                method = spec.baseline(name).method
                if method not in BASELINES:
                    raise ValueError(f"{spec.file}: baseline {name!r} of protocol {proto!r}: unknown method "
                                     f"{method!r}; known: {', '.join(sorted(BASELINES))}")
                ctx = BaselineContext(prepared, cfg, spec, proto, name, dict(spec.baseline(name).args))
                out.setdefault(fam, {}).update(BASELINES[method](ctx))
    return out


def _sasrec_baseline(seq, rows: list[dict], cfg: EvalConfig) -> dict:
    """p5rec's SASRec (full-softmax CE, early-stopped on validation) scored on the same cases."""
    import torch

    from p5rec.eval import sasrec

    t0 = time.time()
    # selected on validation under the protocol it is scored by here (history items allowed unless excluded)
    config = sasrec.SASRecConfig(seed=cfg.seed, device="cuda" if torch.cuda.is_available() else "cpu",
                                 select_exclude_history=cfg.exclude_history)
    train, valid = sasrec.sequential_training_data(seq)
    model, vocab = sasrec.fit(train, config, valid=valid)
    ranked = sasrec.recommend(model, vocab, [r["history"] for r in rows], k=20, exclude_history=cfg.exclude_history)
    out = metrics.ranking_metrics(ranked, [r["target"] for r in rows])
    out.update(epochs=model.epochs_run, best_epoch=model.best_epoch, seconds=round(time.time() - t0, 1))
    logger.info("SASRec baseline: NDCG@10 %.4f HR@10 %.4f (%d epochs, %.0fs)", out["NDCG@10"], out["HR@10"],
                model.epochs_run, out["seconds"])
    return out


FULL_RESULTS = "results.json"  # the run's own evaluation: every family and template, all test cases
_NOT_SELECTION = ("batch_size", "progress")  # EvalConfig fields that do not change the numbers


def is_partial(cfg: EvalConfig) -> bool:
    """Whether ``cfg`` scores less than the full test evaluation: the valid split, fewer families than all, chosen
    templates, or a cap on the cases per template."""
    return (cfg.split != "test" or not set(EvalConfig().families) <= set(cfg.families) or bool(cfg.templates)
            or cfg.max_cases != 0)


def results_path(run_dir: Path, cfg: EvalConfig) -> Path:
    """Where ``p5rec evaluate`` writes the report of ``cfg`` in ``run_dir`` (the ``.md`` sits beside it, same stem).

    The full evaluation writes ``results.json``. A partial one (:func:`is_partial`) writes beside it, never over
    it, to ``results-<split>-<hash>.json``: the hash (12 hex digits of sha256) is over every setting that changes
    the numbers (families and templates sorted), so the same selection always lands in the same file and two
    different selections never share one.
    """
    run_dir = Path(run_dir)
    if not is_partial(cfg):
        return run_dir / FULL_RESULTS
    selection = {k: v for k, v in asdict(cfg).items() if k not in _NOT_SELECTION}
    selection["families"] = sorted(selection["families"])
    selection["templates"] = sorted(selection["templates"])
    digest = hashlib.sha256(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:12]
    return run_dir / f"results-{cfg.split}-{digest}.json"


def evaluate_run(run_dir: Path, cfg: EvalConfig, model=None, tokenizer=None, prepared=None, templates=None,
                 out: Path | None = None) -> dict:
    """Score every selected template of the run on ``cfg.split``; write the report as JSON and Markdown.

    ``out`` is the JSON file (the Markdown goes beside it, same stem); None: :func:`results_path`, so a partial
    evaluation never replaces the full ``results.json``. Both files are written atomically (a temporary sibling,
    then ``os.replace``), after the scoring: a failed or killed evaluation leaves the earlier report whole.

    Without ``model`` the run is opened with :class:`p5rec.run.Run` (its own template files, and its prepared
    data only if the fingerprint matches). A template counts as seen only if the run's training mixture held it.
    A selection that matches no template is an error, not an empty report.
    """
    from p5rec.run import Run, open_prepared_for, read_json, read_run_config, run_templates
    from p5rec.prompts.templates import RenderConfig

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else results_path(run_dir, cfg)
    config = read_run_config(run_dir)
    if model is None:
        run = Run.open(run_dir)
        model, tokenizer, templates = run.model, run.tokenizer, templates or run.templates
        prepared = prepared or run.prepared()
    if prepared is None:
        manifest = run_dir / "manifest.json"
        fp = read_json(manifest).get("fingerprint") if manifest.exists() else None
        prepared = open_prepared_for(config, fp, run_dir)
    if templates is None:
        templates = run_templates(config)
    if cfg.max_source_length is None:
        cfg = replace(cfg, max_source_length=config.get("data", {}).get("max_source_length", 128))
    render_config = RenderConfig(**dict(config["render"]))
    id_form = render_config.id_form
    data_of = {f: templates.family_info(f).data for f in templates.families}
    unknown = [f for f in cfg.families if f not in data_of] + [t for t in cfg.templates if t not in templates]
    if unknown:
        raise ValueError(f"unknown families or templates {unknown}: families are {sorted(data_of)}, "
                         "template ids are listed by `p5rec templates list`")
    families = set(cfg.families)
    if set(shipped_specs()) <= families:  # every family: the run's own (--template_files) ones too
        families |= set(data_of)
    chosen = [
        t for t in templates
        if t.family in families and prepared.has_family(data_of[t.family])
        and (not cfg.templates or t.id in cfg.templates)
        and _renderable(t, prepared)
    ]
    trained = config.get("mixture", {}).get("trained_templates")
    if not cfg.templates and trained is not None and not any(
            t.scoring == "sequence" for t in templates if t.id in trained):
        # the continuation protocol reads the decoder as a sequence model: meaningless (and not zero-shot
        # transfer) for a run that never trained one; asked for by --templates, it is scored all the same
        skipped = [t.id for t in chosen if t.scoring == "sequence"]
        chosen = [t for t in chosen if t.scoring != "sequence"]
        if skipped:
            logger.info("not scoring %s: this run trained no sequence template", ",".join(skipped))
    if not chosen:
        raise ValueError(f"nothing to evaluate: no template of {list(cfg.families)}"
                         f"{' among ' + ','.join(cfg.templates) if cfg.templates else ''} renders on this "
                         f"run's data ({', '.join(sorted(f for f in data_of if prepared.has_family(data_of[f])))})")
    tries = {"catalogue": build_catalogue_trie(prepared, tokenizer, id_form)}
    logger.info("evaluating %d templates on %s", len(chosen), cfg.split)
    results = []
    started = time.time()
    for t in chosen:
        r = score_template(model, tokenizer, prepared, t, cfg, render_config, tries, data_of[t.family], templates)
        if trained is not None:
            r.seen = t.id in trained
        logger.info("%-6s %-11s %-7s n=%-5d %s (%.1fs)", r.template, r.family, "seen" if r.seen else "unseen",
                    r.n, _fmt(r.metrics), r.seconds)
        results.append(r)
    report = {
        "run": str(run_dir),
        "split": cfg.split,
        "eval_config": asdict(cfg),
        "decoding": {"num_beams": cfg.num_beams, "text_beams": cfg.text_beams, "max_new_tokens": cfg.max_new_tokens,
                     "text_no_repeat_ngram": cfg.text_no_repeat_ngram,
                     "text_repetition_penalty": cfg.text_repetition_penalty,
                     "text_contrast": {f: asdict(d) for f in cfg.families
                                       if (d := text_decoding_of(f, templates, cfg)).contrast},
                     "text_choose": {f: asdict(d) for f in cfg.families
                                     if (d := text_decoding_of(f, templates, cfg)).choose},
                     "id_form": id_form, "restricted": "prefix trie over the catalogue / saved candidates"},
        "manifest_fingerprint": prepared.manifest.get("fingerprint"),
        "manifest_sha256": hashlib.sha256((Path(prepared.path) / "manifest.json").read_bytes()).hexdigest(),
        "model": {"parameters": int(sum(p.numel() for p in model.parameters())), "preset": config["model"]["preset"]},
        "templates": {r.template: {k: v for k, v in asdict(r).items() if k != "stars"} for r in results},
        "families": aggregate(results),
        "baselines": run_baselines(prepared, cfg, {f: templates.family_info(f) for f in templates.families})
        if cfg.baselines else {},
    }
    for fam, ens in star_ensembles(results, {f: templates.family_info(f) for f in templates.families}).items():
        # the family's "seen" row: not a mean of the templates' RMSEs but the RMSE of their mean expected star
        report["families"].setdefault(fam, {}).setdefault("rating", {}).setdefault("seen", {}).update(
            {k: ens[k] for k in ENSEMBLE_METRICS})
        report.setdefault("star_ensembles", {})[fam] = ens
    if cfg.reliance_cases:
        t1 = time.time()
        report["prompt_reliance"] = prompt_reliance(model, tokenizer, prepared, chosen, cfg, render_config,
                                                    templates, set(trained) if trained is not None else None)
        logger.info("prompt reliance (nats per answer token gained by the case's own prompt): %s (%.1fs)",
                    {f: round(g["seen"]["gain"], 4) for f, g in report["prompt_reliance"]["families"].items()
                     if g.get("seen")}, time.time() - t1)
    report["seconds"] = round(time.time() - started, 1)
    specs = {f: templates.family_info(f) for f in templates.families}
    report["headline"] = headline_rows(report, specs)
    images = _draw_plots(run_dir, report, out, specs)
    md = results_markdown(report, images, specs)
    atomic.write_text(out, json.dumps(report, indent=2))
    atomic.write_text(out.with_suffix(".md"), md)
    print(md)
    logger.info("wrote %s and %s", out, out.with_suffix(".md"))
    if out.parent.resolve() == run_dir.resolve() and out.name == FULL_RESULTS:
        from p5rec.eval import modelcard

        modelcard.write_model_card(run_dir)  # the card shows the run's own results: refreshed with them
    return report


def _higher_is_better(key: str) -> bool:
    try:
        return metrics.lookup(key.removesuffix("_expected").removesuffix("_calibrated")).higher_is_better
    except KeyError:
        return key not in ("invalid",)


def results_panels(report: dict, specs: dict[str, FamilySpec] | None = None) -> list:
    """One bar panel per family and protocol: the headline metric's mean over seen and over unseen templates,
    beside every baseline its spec declares for that protocol that was scored."""
    from p5rec.eval.plots import Bar, Panel

    panels = []
    for fam, proto, groups, declared, metric, have in _headlines(report, specs):
        bars = [Bar(f"p5rec, {group} templates", groups[group][metric], group)
                for group in ("seen", "unseen") if metric in groups.get(group, {})]
        bars += [Bar(name, have[name][metric], "baseline") for name in declared.baselines
                 if metric in have.get(name, {})]
        panels.append(Panel(f"{fam} ({proto})", metric, bars, lower_is_better=not _higher_is_better(metric)))
    return panels


def _draw_plots(run_dir: Path, report: dict, out: Path, specs: dict | None = None) -> list[tuple[str, str]]:
    """The results beside their baselines as ``<out stem>.png`` and, for a run that lacks it, the learning curve;
    returns (caption, file name) for results.md. A plot that fails to draw is a warning, never lost results."""
    from p5rec.eval import plots

    images = []
    try:
        png = plots.bar_panels(results_panels(report, specs), out.with_suffix(".png"),
                               f"{run_dir.name}: {report['split']} split, beside the baselines")
        if png is not None:
            images.append((f"{report['split'].capitalize()} results per family beside the baselines", png.name))
        curve = run_dir / "learning_curve.png"
        if not curve.exists() and (run_dir / "learning_curve.json").is_file():
            plots.learning_curve_plot(run_dir, curve_metrics(specs))
        if curve.exists():
            images.append(("Learning curve (validation)", curve.name))
    except Exception as exc:  # noqa: BLE001 - matplotlib failures are many and none is worth the results
        logger.warning("could not draw the plots of %s: %s: %s", out, type(exc).__name__, exc)
    return images


def _renderable(template, prepared) -> bool:
    return not template.needs_titles or prepared.items is not None


# Generated text with fewer distinct bigrams than this (x100, over all of a template's outputs) is degenerate:
# one sentence for (nearly) every case, or a loop within one. Varied text of a few words per case stays far
# above it (the nearest-neighbour baselines on MI: distinct-2 of 40-60); a constant output is near 0.
DEGENERATE_DISTINCT2 = 10.0


def degenerate_templates(report: dict) -> list[tuple[str, float]]:
    """(template, distinct-2) of every template whose generated text is degenerate (:data:`DEGENERATE_DISTINCT2`)."""
    return [(tid, r["metrics"]["distinct-2"]) for tid, r in report["templates"].items()
            if "distinct-2" in r["metrics"] and r["metrics"]["distinct-2"] < DEGENERATE_DISTINCT2]


def _text_decoding_line(d: dict) -> str:
    """How the report's text was decoded, in one sentence (reports before per-family contrast hold a number)."""
    line = (f"Text: {d.get('text_beams', '?')} beams, at most {d.get('max_new_tokens', '?')} tokens"
            + (f", no repeated {d['text_no_repeat_ngram']}-gram" if d.get("text_no_repeat_ngram") else ""))
    contrast = d.get("text_contrast")
    if isinstance(contrast, dict):
        for fam, c in contrast.items():
            against = (f"its prompt without {', '.join(c['without'])}" if c.get("without")
                       else "another case's prompt")
            line += (f"; {fam} decoded against {against} (contrast {c['contrast']:g}"
                     + (f", plausibility {c['plausibility']:g}" if c.get("plausibility") else "") + ")")
    elif contrast:
        line += f"; every family decoded against another case's prompt (contrast {contrast:g})"
    for fam, c in (d.get("text_choose") or {}).items():
        line += (f"; {fam} chosen among at most {c['candidates']} training texts of the case's {c['choose']}"
                 + (f" (those mentioning the shown {', '.join(c['hints'])})" if c.get("hints") else "")
                 + f", scored log P / tokens^{c['length_penalty']:g}")
    return line + "."


def results_markdown(report: dict, images: list[tuple[str, str]] = (),
                     specs: dict[str, FamilySpec] | None = None) -> str:
    """The report as Markdown; ``images`` (caption, file name beside the .md) are linked under the title. What
    each family shows comes from its spec (``protocols:`` in its templates.yaml): the headline metric and
    baselines per protocol, and the metric columns of its table. ``specs``: family -> spec (default: the
    shipped families)."""
    specs = shipped_specs() if specs is None else specs
    lines = [f"# Results on the {report['split']} split", ""]
    lines.append(f"Run: `{report['run']}` — model {report['model']['preset']} "
                 f"({report['model']['parameters'] / 1e6:.2f} M parameters), ids `{report['decoding']['id_form']}`.")
    lines.append(_text_decoding_line(report["decoding"]))
    for caption, name in images:
        lines += ["", f"![{caption}]({name})"]
    lines += ["", "## Headline: mean over templates, seen and unseen, beside the baseline", "",
              "| family | protocol | metric | seen | unseen | baseline |", "|---|---|---|---|---|---|"]
    for row in report.get("headline") or headline_rows(report, specs):
        base_cell = f"{_cell(row['baseline_value'])} ({row['baseline']})" if row["baseline"] else "–"
        lines.append(f"| {row['family']} | {row['protocol']} | {row['metric']} | {_cell(row['seen'])} | "
                     f"{_cell(row['unseen'])} | {base_cell} |")
    lines.append("")
    bad = degenerate_templates(report)
    if bad:
        lines += [f"**Degenerate text** (distinct-2 below {DEGENERATE_DISTINCT2:g}: one output for nearly every case): "
                  + ", ".join(f"{t} ({v:.2f})" for t, v in bad)
                  + ". Read their ROUGE against the most-common-text baseline, not as generation.", ""]
    reliance = (report.get("prompt_reliance") or {}).get("families")
    if reliance:
        lines += ["## Does the model read its prompt?", "",
                  "Log-loss of the answers (nats per answer token, mean over templates) under each case's own "
                  "prompt and under another case's prompt of the same template: the words are the same, the user, "
                  "item, history, candidates or hint are not. The gain is what the case's details are worth to "
                  "the model; near 0, it answers from the template's words alone.", "",
                  "| family | templates | own prompt | another case's prompt | gain |", "|---|---|---|---|---|"]
        for fam, groups in reliance.items():
            for group in ("seen", "unseen"):
                g = groups.get(group)
                if g:
                    lines.append(f"| {fam} | {g['templates']} {group} | {g['nll']:.4f} | "
                                 f"{g['nll_other_prompt']:.4f} | {g['gain']:.4f} |")
        lines.append("")
        unread = unread_families(report)
        if unread:
            lines += [f"**Not read** (gain below {PROMPT_READ_FLOOR:g} nats on seen templates): "
                      + ", ".join(f"{f} ({g:.4f})" for f, g in unread)
                      + ". Their answers do not depend on the case: read their rows as the answers' marginal "
                      "distribution, not as personalization.", ""]
    by_family: dict[str, list[dict]] = {}
    for r in report["templates"].values():
        by_family.setdefault(r["family"], []).append(r)
    for fam, rows in by_family.items():
        shown = specs[fam].metrics if fam in specs else []
        keys = [k for k in shown if any(k in r["metrics"] for r in rows)]
        base = report["baselines"].get(fam, {})
        keys += [k for k in sorted({k for b in base.values() for k in b}) if k in shown and k not in keys]
        lines += [f"## {fam}", "", "| template | protocol | seen | n | " + " | ".join(keys) + " |",
                  "|---|---|---|---|" + "---|" * len(keys)]
        for r in rows:
            vals = [_cell(r["metrics"].get(k)) for k in keys]
            lines.append(f"| {r['template']} ({r['scoring']}) | {protocol(r)} | "
                         f"{'seen' if r['seen'] else '**unseen**'} | {r['n']} | " + " | ".join(vals) + " |")
        for proto, groups in report["families"].get(fam, {}).items():
            for group in ("seen", "unseen"):
                if groups.get(group):
                    lines.append(f"| *mean {group}* | {proto} | | | "
                                 + " | ".join(_cell(groups[group].get(k)) for k in keys) + " |")
        ens = report.get("star_ensembles", {}).get(fam)
        if ens:  # under the expected and calibrated columns: the same estimates, averaged over the templates first
            as_column = {"RMSE_expected": "RMSE_ensemble", "MAE_expected": "MAE_ensemble",
                         "RMSE_calibrated": "RMSE_ensemble_calibrated", "MAE_calibrated": "MAE_ensemble_calibrated"}
            lines.append(f"| *expected star averaged over {', '.join(ens['templates'])}* | rating | seen | {ens['n']} | "
                         + " | ".join(_cell(ens.get(as_column.get(k, ""))) for k in keys) + " |")
        for name, m in base.items():
            lines.append(f"| baseline: {name} | | | {m.get('n', '')} | " + " | ".join(_cell(m.get(k)) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def headline_rows(report: dict, specs: dict[str, FamilySpec] | None = None) -> list[dict]:
    """Per family and protocol: the headline metric its spec declares, its mean over seen and unseen templates,
    and the baseline beside it (the first of the spec's ``baselines`` that was scored), with the metric's
    direction. Saved in results.json as ``headline``: results.md and the model card read it."""
    rows = []
    for fam, proto, groups, declared, metric, have in _headlines(report, specs):
        base_name = next((b for b in declared.baselines if metric in have.get(b, {})), None)
        rows.append({"family": fam, "protocol": proto, "metric": metric,
                     "seen": groups.get("seen", {}).get(metric), "unseen": groups.get("unseen", {}).get(metric),
                     "baseline": base_name, "baseline_value": have[base_name][metric] if base_name else None,
                     "higher_is_better": _higher_is_better(metric)})
    return rows


def _headlines(report: dict, specs: dict[str, FamilySpec] | None = None):
    """(family, protocol, groups, declared protocol spec, headline metric, scored baselines) for every family and
    protocol of ``report`` whose spec declares a headline metric its templates report."""
    specs = shipped_specs() if specs is None else specs
    for fam, protos in report["families"].items():
        for proto, groups in protos.items():
            declared = specs[fam].protocols.get(proto) if fam in specs else None
            metric = _headline_metric(declared, groups)
            if metric is not None:
                yield fam, proto, groups, declared, metric, report["baselines"].get(fam, {})


def _headline_metric(declared, groups: dict) -> str | None:
    """The protocol's declared headline metric, if its templates report it (None: no headline row)."""
    have = set(groups.get("seen", {})) | set(groups.get("unseen", {}))
    return declared.headline if declared is not None and declared.headline in have else None


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)) or float(v).is_integer() and abs(v) > 1:
        return str(int(v))
    return f"{v:.4f}" if abs(v) < 1.5 else f"{v:.2f}"


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in m.items() if k not in ("n",))


def add_cli(subparsers) -> None:
    from p5rec.argtypes import float_at_least, int_at_least

    p = subparsers.add_parser("evaluate", help="score a trained run on the test split, per template and family")
    p.add_argument("--run", required=True, type=Path, help="run directory written by train.py")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--families", default=None, help="comma-separated families (default: all)")
    p.add_argument("--templates", default=None, help="comma-separated template ids (default: all)")
    p.add_argument("--max-users", type=int_at_least(0), default=0, help="cases per template (0: all)")
    p.add_argument("--max-candidate-users", type=int_at_least(0), default=200,
                   help="users for yes/no-per-candidate templates (each costs 100 prompts; 0: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--beams", type=int_at_least(1), default=20, help="beam width for restricted item generation")
    p.add_argument("--text-beams", type=int_at_least(1), default=EvalConfig.text_beams,
                   help="beam width for text generation (1: greedy)")
    p.add_argument("--text-no-repeat-ngram", type=int_at_least(0), default=EvalConfig.text_no_repeat_ngram,
                   help="no n-gram twice in generated text (0: off)")
    p.add_argument("--text-repetition-penalty", type=float, default=EvalConfig.text_repetition_penalty,
                   help="CTRL repetition penalty for generated text (1.0: off)")
    p.add_argument("--text-contrast", type=float_at_least(0), default=None,
                   help="context-aware decoding of text, for every family: weight of the contrast (0: off; "
                        "default: each family's decoding: in its templates.yaml)")
    p.add_argument("--text-plausibility", type=float, default=None,
                   help="with contrast: keep only tokens within this factor of the best one (0: all; default: "
                        "each family's)")
    p.add_argument("--text-contrast-without", default=None,
                   help="the fields the contrast prompt leaves empty (comma-separated, e.g. review,feature; '': "
                        "another case's prompt instead; default: each family's)")
    p.add_argument("--text-choose", default=None,
                   help="choose each case's text among the training texts of this field's value (e.g. item; "
                        "'none': write it token by token; default: each family's decoding:)")
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item of the history")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-sasrec", action="store_true", help="skip training SASRec as the sequential baseline")
    p.add_argument("--reliance-cases", type=int_at_least(0), default=EvalConfig.reliance_cases,
                   help="cases per template for the does-it-read-its-prompt control (0: skip it)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = EvalConfig(
        split=args.split,
        max_cases=args.max_users,
        max_candidate_cases=args.max_candidate_users,
        batch_size=args.batch_size,
        num_beams=args.beams,
        text_beams=args.text_beams,
        text_no_repeat_ngram=args.text_no_repeat_ngram,
        text_repetition_penalty=args.text_repetition_penalty,
        text_contrast=args.text_contrast,
        text_plausibility=args.text_plausibility,
        text_contrast_without=None if args.text_contrast_without is None else tuple(
            f.strip() for f in args.text_contrast_without.split(",") if f.strip()),
        text_choose=None if args.text_choose is None else ("" if args.text_choose.strip() in ("", "none")
                                                           else args.text_choose.strip()),
        exclude_history=args.exclude_history,
        baselines=not args.no_baselines,
        sasrec=not args.no_sasrec,
        reliance_cases=args.reliance_cases,
    )
    if args.families:
        cfg.families = tuple(f.strip() for f in args.families.split(","))
    if args.templates:
        cfg.templates = tuple(t.strip() for t in args.templates.split(","))
    if not (args.run / "run_config.json").exists():
        print(f"p5rec evaluate: {args.run} is not a run directory (no run_config.json)", file=sys.stderr)
        return 2
    from p5rec.run import RunError

    out = results_path(args.run, cfg)
    try:
        evaluate_run(args.run, cfg, out=out)
    except (RunError, ValueError) as exc:
        print(f"p5rec evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"p5rec evaluate: wrote {out} and {out.with_suffix('.md')}"
          + (" (a partial evaluation: results.json is left as it was)" if is_partial(cfg) else ""))
    return 0
