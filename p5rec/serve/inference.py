"""Per-task inference over a trained run: raw ids in, raw ids out.

    >>> rec = P5Rec.from_pretrained("runs/2026...-mini-random")
    >>> rec.recommend(history=["B0002E1G5C", "B0002GXF8Q"], user="A2IBPI20UZIR0U", k=5)
    [Prediction(item='B003VWJ2K8', score=-2.1), ...]

Each task method renders its request with a template of the run (a sensible seen template by default; any id of
that family may be named), decodes with the same restricted decoding as evaluation — so a recommended item is
always a catalogue item, never repeated — and returns plain Python values.

Cold start: a user id the run never saw cannot be written as a user token. ``recommend`` and ``rank`` then fall
back to a template that names the user by ``user_name`` and pass a generic name, so the answer rests on the given
history alone; ``predict_rating``/``explain`` need a known user and raise :class:`UnknownIdError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from p5rec import atomic
from p5rec.train.routing import family_route

logger = logging.getLogger(__name__)

COLD_START_NAME = "a new customer"
# The default template of each task method is a role its family declares (``inference:`` in the family's
# templates.yaml, p5rec.prompts.families.ROLES): an id, or one for a known user and one for a new user.


class UnknownIdError(KeyError):
    """A raw user or item id that the run's index does not know; ``field`` names the request field that held it
    (``user``, ``item``, ``history``, ``candidates``), or is None."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class RequestError(ValueError):
    """A request whose fields are missing or of the wrong type; the message names the field (and the line), and
    so does ``field`` (None when the request as a whole is wrong: not an object, no task)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# ------------------------------------------------------------------------------------- request checking
TASKS = ("sequential", "direct", "rank", "rating", "explanation", "review", "review_rating")
# fields a task cannot do without
REQUIRED = {"direct": ("candidates",), "rank": ("candidates",), "rating": ("user", "item"),
            "explanation": ("user", "item"), "review": ("review",), "review_rating": ("review",)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# field -> (check, what it must be); a field that is absent or null is not checked (only REQUIRED ones must be there)
FIELD_CHECKS = {
    "user": (lambda v: isinstance(v, str), "a string (a raw user id)"),
    "user_name": (lambda v: isinstance(v, str), "a string"),
    "item": (lambda v: isinstance(v, str) and v != "", "a non-empty string (a raw item id)"),
    "history": (_is_ids, "a list of strings (raw item ids, oldest first)"),
    "candidates": (lambda v: _is_ids(v) and len(v) > 0, "a non-empty list of strings (raw item ids)"),
    "k": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "review": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "feature": (lambda v: isinstance(v, str), "a string"),
    "rating": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
               "a finite number"),
    "template": (lambda v: isinstance(v, str) and v != "", "a template id string"),
    "exclude_history": (lambda v: isinstance(v, bool), "true or false"),
}


def check_request(request, line: int | None = None) -> dict:
    """The one check of a request's fields, before anything is rendered or decoded.

    ``request`` is what a JSON line or the CLI gave: it must be an object with a known ``task``, the fields
    that task requires (``REQUIRED``), and every field present of the right type (``FIELD_CHECKS``: ``"k": "three"``,
    ``"k": 0``, ``"candidates": 5``, ``"history": "abc"`` are refused, never coerced). Unknown keys are left alone
    (a client may tag its requests). Returns the request without its null fields (null means "not given", so the
    defaults apply); raises :class:`RequestError` whose message starts with ``line N:`` when ``line`` is given and
    names the field.
    """
    where = f"line {line}: " if line is not None else ""
    if not isinstance(request, dict):
        raise RequestError(f"{where}not a JSON object (found {_json_type(request)}); each line is one request "
                           "object like {\"task\": \"sequential\", \"history\": [...]}")
    task = request.get("task")
    if task is None:
        raise RequestError(f"{where}field 'task' is required (one of {', '.join(TASKS)})", "task")
    if task not in TASKS:
        raise RequestError(f"{where}unknown task {task!r}; expected one of {', '.join(TASKS)}", "task")
    for name in REQUIRED.get(task, ()):
        if request.get(name) is None:
            raise RequestError(f"{where}field {name!r} is required for task {task!r}", name)
    for name, (ok, what) in FIELD_CHECKS.items():
        value = request.get(name)
        if value is not None and not ok(value):
            raise RequestError(f"{where}field {name!r} must be {what}, got {_shown(value)}", name)
    return {key: value for key, value in request.items() if value is not None}


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Prediction:
    item: str
    score: float


class P5Rec:
    """A trained p5rec run, ready to answer requests for every task family."""

    def __init__(self, model, tokenizer, index, templates, render_config, max_source_length: int = 128,
                 trained: set[str] | None = None, trie=None, calibration: dict | None = None, prepared=None,
                 star_ensembles: dict | None = None):
        from p5rec.eval.decoding import ItemTrie

        self.model, self.tokenizer, self.index = model, tokenizer, index
        # the prepared data the run trained on, or a callable returning it: the training texts a family whose
        # decoding chooses its text (explanation) answers among; None: that text is written token by token
        self._prepared, self._pools = prepared, {}
        # template id -> (intercept, slope): each rating template's expected star calibrated on validation
        self.calibration = dict(calibration or {})
        # family -> {"templates": ids, "line": (intercept, slope) or None}: the expected star averaged over those
        # templates, as the run's test evaluation scored it (Run.star_ensembles)
        self.star_ensembles = dict(star_ensembles or {})
        self.templates, self.render_config = templates, render_config
        self.max_source_length = max_source_length
        self.trained = trained  # template ids of the training mixture (None: unknown, every seen template)
        if trie is None:
            surfaces = {raw: index.item_text(raw, render_config.id_form) for raw in index.items}
            trie = ItemTrie.from_surfaces(tokenizer, surfaces)
        self.trie = trie

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | None = None) -> "P5Rec":
        """Load a run directory written by ``train.py`` (model, tokenizer, index.json, run_config.json)."""
        from p5rec.run import Run, RunError

        try:
            run = Run.open(run_dir, device)
        except RunError as exc:
            raise FileNotFoundError(str(exc)) from None
        return cls.from_run(run)

    @classmethod
    def from_run(cls, run) -> "P5Rec":
        """Answer requests with a :class:`p5rec.run.Run` already open (``p5rec serve`` keeps the run for its
        metadata and the studio's records)."""
        return cls(run.model, run.tokenizer, run.index, run.templates, run.render_config, run.max_source_length,
                   run.trained_templates, run.trie, run.star_calibration, prepared=run.prepared,
                   star_ensembles=run.star_ensembles)

    def _text_pool(self, template, spec):
        """The :class:`~p5rec.eval.evaluation.TextPool` ``template``'s text is chosen among (built once per family
        and target), or None when the run's prepared data cannot be read (said once in the log)."""
        from p5rec.eval.evaluation import text_pool
        from p5rec.run import RunError

        key = (template.family, tuple(sorted(template.target_variables)), spec)
        if key not in self._pools:
            pool, why = None, "no prepared data given"
            try:
                prepared = self._prepared() if callable(self._prepared) else self._prepared
                if prepared is not None:
                    pool = text_pool(prepared, self.templates.family_info(template.family).data, template, spec)
            except (RunError, ValueError, KeyError) as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if pool is None:
                logger.warning("%s text is written token by token, not chosen among training texts as evaluated: "
                               "%s", template.family, why)
            self._pools[key] = pool
        return self._pools[key]

    # ------------------------------------------------------------------ helpers
    def _check_items(self, items: Sequence[str], where: str = "", field: str | None = None) -> None:
        for i in items:
            if i not in self.index.items:
                raise UnknownIdError(
                    f"unknown item {i!r}{' (' + where + ')' if where else ''}: "
                    f"not in this run's catalogue ({len(self.index.items)} items)", field)

    def known_user(self, user: str | None) -> bool:
        return bool(user) and user in self.index.users

    def _need_user(self, user: str) -> None:
        if not self.known_user(user):
            raise UnknownIdError(
                f"unknown user {user!r}: not among this run's {len(self.index.users)} users "
                "(rating and explanation prompts need a known user; recommend/rank accept new users)", "user")

    def check_ids(self, request: dict) -> None:
        """Every raw id of a checked request (:func:`check_request`) is one this run knows, or
        :class:`UnknownIdError` naming the first that is not and its field. Cheap (dictionary look-ups): a server
        calls it before queueing the request, so a batch is not held up by a request that cannot be answered."""
        task = request["task"]
        if task in USER_TASKS:
            self._need_user(request["user"])
        if request.get("item") is not None:
            self._check_items([request["item"]], field="item")
        self._check_items(request.get("history") or [], "in the history", "history")
        self._check_items(request.get("candidates") or [], "a candidate", "candidates")

    def _family_of(self, role: str) -> str | None:
        """The family whose spec declares ``role`` (its ``inference:``), None if no loaded family does."""
        return next((f for f in self.templates.families if role in self.templates.family_info(f).inference), None)

    def default_template(self, role: str, known_user: bool = True) -> str:
        """The template id a task method uses for ``role`` unless told otherwise (for a known or a new user)."""
        family = self._family_of(role)
        if family is None:
            raise ValueError(f"no family of this run declares a default template for {role!r} "
                             "(`inference:` in its templates.yaml); pass template=")
        return self.templates.family_info(family).inference[role][0 if known_user else 1]

    def _template(self, template_id: str, role: str):
        """``template_id``, checked to belong to the family that declares ``role``; recommending and ranking with a
        history also take a template of the family that ranks without one (``rank_direct``). A template the run
        does not have, or one of another family, is a :class:`RequestError` naming the ``template`` field."""
        family = self._family_of(role)
        if family is None:
            self.default_template(role)  # raises: no family declares the role
        also = self._family_of("rank_direct") if role in ("recommend", "rank") else None
        try:
            t = self.templates.get(template_id)
        except KeyError as exc:
            raise RequestError(f"{exc.args[0]}", "template") from None
        if t.family != family and t.family != also:
            raise RequestError(f"template {template_id} belongs to family {t.family!r}, not {family!r}", "template")
        return t

    def _sources(self, template, records: list[dict]) -> list[str]:
        from p5rec.prompts.templates import render_records

        return [s for s, _ in render_records(template, records, self.index, self.render_config)]

    def _user_fields(self, user: str | None, user_name: str | None) -> dict:
        if self.known_user(user):
            return {"user": user, "user_name": user_name or ""}
        return {"user": "", "user_name": user_name or COLD_START_NAME}

    # ------------------------------------------------------------------ tasks
    # Each task has a batched method taking a list of request dicts (the fields of :func:`check_request`, without
    # ``task``), which renders every prompt and decodes them together; the one-request methods call it with one.
    def _recommend_template(self, known_user: bool) -> str:
        """A trained sequence template when the run has one (the continuation protocol), else the default.

        A user the run does not know cannot be written as a user token: then a template that names no user id
        (or any, when the run renders every user anonymously)."""
        family = self._family_of("recommend")
        seq = [t for t in self.templates.by_family(family)
               if t.scoring == "sequence" and (self.trained is None and t.seen or t.id in (self.trained or ()))]
        if seq:
            usable = seq if known_user or self.render_config.anonymous_users else \
                [t for t in self.templates.by_family(family)
                 if t.scoring == "sequence" and "user" not in t.variables]
            if usable:
                return usable[0].id
        return self.default_template("recommend", known_user)

    def recommend_batch(self, requests: list[dict], k: int = 10, template: str | None = None,
                        exclude_history: bool = True) -> list[list[Prediction]]:
        """Next items for each ``{"history": [...], "user": ...}``; restricted to the catalogue.

        With a ``sequence`` template (the default when the run trained one) the decoder continues the history
        (the continuation protocol); with a history-in-the-prompt template it answers the prompt."""
        from p5rec.eval.decoding import continue_items, rank_items

        groups: dict[str, list[int]] = {}
        for n, r in enumerate(requests):
            self._check_items(r.get("history") or [], "in the history", "history")
            tid = template or self._recommend_template(self.known_user(r.get("user")))
            groups.setdefault(tid, []).append(n)
        out: list[list[Prediction]] = [[] for _ in requests]
        for tid, idx in groups.items():
            t = self._template(tid, "recommend")
            recs = [dict(self._user_fields(requests[i].get("user"), requests[i].get("user_name")),
                         history=list(requests[i].get("history") or [])) for i in idx]
            if "user" in t.variables and not self.render_config.anonymous_users and any(not r["user"] for r in recs):
                raise UnknownIdError(f"template {tid} needs a known user id; use a user_name template for new users",
                                     "user")
            exclude = [r["history"] for r in recs] if exclude_history else None
            with family_route(self.model, t.family):
                if t.scoring == "sequence":
                    ranked = continue_items(self.model, self.tokenizer, self._sources(t, recs),
                                            [r["history"] for r in recs], self.trie, k=k, exclude=exclude,
                                            max_items=max(self.render_config.max_sequence - 1, 0),
                                            max_source_length=self.max_source_length)
                else:
                    ranked = rank_items(self.model, self.tokenizer, self._sources(t, recs), self.trie, k=k,
                                        exclude=exclude, max_source_length=self.max_source_length)
            for i, r in zip(idx, ranked):
                out[i] = [Prediction(item, score) for item, score in r]
        return out

    def recommend(self, history: Sequence[str], user: str | None = None, k: int = 10, template: str | None = None,
                  exclude_history: bool = True, user_name: str | None = None) -> list[Prediction]:
        return self.recommend_batch([{"history": list(history), "user": user, "user_name": user_name}], k,
                                    template, exclude_history)[0]

    def rank_batch(self, requests: list[dict]) -> list[list[Prediction]]:
        """Each ``{"candidates": [...], "user": ..., "history": [...], "template": ...}`` ordered best first
        (a sequential candidate template with a history, a direct one without; all of each request's candidates)."""
        from p5rec.eval.decoding import rank_items

        groups: dict[tuple[str, bool], list[int]] = {}
        for n, r in enumerate(requests):
            self._check_items(r["candidates"], "a candidate", "candidates")
            self._check_items(r.get("history") or [], "in the history", "history")
            key = "rank" if r.get("history") else "rank_direct"
            tid = r.get("template") or self.default_template(key, self.known_user(r.get("user")))
            groups.setdefault((tid, bool(r.get("history"))), []).append(n)
        out: list[list[Prediction]] = [[] for _ in requests]
        for (tid, has_history), idx in groups.items():
            t = self._template(tid, "rank" if has_history else "rank_direct")
            recs = [dict(self._user_fields(requests[i].get("user"), requests[i].get("user_name")),
                         history=list(requests[i].get("history") or []), candidates=list(requests[i]["candidates"]))
                    for i in idx]
            tries = [self.trie.subset(r["candidates"]) for r in recs]
            with family_route(self.model, t.family):
                ranked = rank_items(self.model, self.tokenizer, self._sources(t, recs), tries,
                                    k=max(len(r["candidates"]) for r in recs),
                                    max_source_length=self.max_source_length)
            for i, r in zip(idx, ranked):
                out[i] = [Prediction(item, score) for item, score in r]
        return out

    def rank(self, candidates: Sequence[str], user: str | None = None, history: Sequence[str] | None = None,
             template: str | None = None, user_name: str | None = None) -> list[Prediction]:
        """Order given candidates (sequential candidate template with a history, direct template without)."""
        return self.rank_batch([{"candidates": list(candidates), "user": user, "history": list(history or []),
                                 "template": template, "user_name": user_name}])[0]

    def _generate(self, role: str, default: str, requests: list[dict], records: list[dict], text: bool = False,
                  **decoding) -> list[str]:
        """Text for each request's record (its ``template``, else ``default``, of the family declaring ``role``),
        one ``generate`` call per template; ``text``: decoded as the evaluation decodes the family's text (its
        spec's context-aware decoding included)."""
        from p5rec.eval.decoding import generate_text
        from p5rec.eval.evaluation import choose_for, text_contrast, text_decoding_of

        out = [""] * len(requests)
        for tid, idx in _by_template(requests, default).items():
            t = self._template(tid, role)
            if "rating" in t.variables - t.target_variables and any(records[i].get("rating") is None for i in idx):
                raise RequestError(f"template {tid} shows the star rating: pass rating", "rating")
            recs = [records[i] for i in idx]
            spec = text_decoding_of(t.family, self.templates) if text else None
            pool = self._text_pool(t, spec) if spec is not None and spec.choose else None
            contrast = text_contrast(spec, t, recs, lambda rs: self._sources(t, rs)) if text else {}
            with family_route(self.model, t.family):
                if pool is not None:  # as the evaluation scored it: one of the case's candidate training texts
                    texts = choose_for(self.model, self.tokenizer, pool, spec, t, self._sources(t, recs), recs,
                                       max_source_length=self.max_source_length)
                else:
                    texts = generate_text(self.model, self.tokenizer, self._sources(t, recs),
                                          max_source_length=self.max_source_length, **decoding, **contrast)
            for i, text in zip(idx, texts):
                out[i] = text
        return out

    @staticmethod
    def _rating_answer(text: str) -> dict:
        from p5rec.eval.metrics import parse_rating

        value = parse_rating(text)
        return {"rating": None if value is None else min(5.0, max(1.0, value)), "text": text}

    def predict_rating_batch(self, requests: list[dict]) -> list[dict]:
        """For each ``{"user": ..., "item": ..., "template": ...}``: {"rating": the greedy answer as a float in
        [1, 5] or None, "text": that answer, "expected": the expected star under the model's distribution over
        "1".."5" (the estimate with the lower squared error; None for a template whose answer is not the star),
        "calibrated": that star on the line fitted to the template's validation cases by the run's test
        evaluation (``results.json``; None before one, or for a template it did not score), "expected_mean": the
        expected star averaged over the rating templates that evaluation averaged (its ``star_ensembles``; the
        estimate with the lowest squared error on the main job's test split), "calibrated_mean": that mean on its
        own validation line (both None before a test evaluation)}."""
        for r in requests:
            self._need_user(r["user"])
            self._check_items([r["item"]], field="item")
        records = [{"user": r["user"], "item": r["item"]} for r in requests]
        default = self.default_template("rating")
        texts = self._generate("rating", default, requests, records, max_new_tokens=6)
        expected = self._expected_stars("rating", default, requests, records)
        means = self._mean_stars("rating", records)
        return [dict(self._rating_answer(t), expected=e, calibrated=self._calibrated(r.get("template") or default, e),
                     expected_mean=m, calibrated_mean=c) for t, e, r, (m, c) in zip(texts, expected, requests, means)]

    def _mean_stars(self, role: str, records: list[dict]) -> list[tuple[float | None, float | None]]:
        """(expected star averaged over the role family's ensemble templates, that mean calibrated) per record."""
        import numpy as np

        from p5rec.eval.evaluation import apply_calibration, expected_stars

        family = self._family_of(role)
        ens = self.star_ensembles.get(family) if family else None
        if not ens or not records:
            return [(None, None)] * len(records)
        per = []
        for tid in ens["templates"]:
            t = self._template(tid, role)
            with family_route(self.model, t.family):
                per.append(expected_stars(self.model, self.tokenizer, self._sources(t, records),
                                          max_source_length=self.max_source_length))
        mean = np.mean(per, axis=0)
        calibrated = apply_calibration(mean, *ens["line"]) if ens.get("line") else [None] * len(mean)
        return [(round(float(m), 4), None if c is None else round(float(c), 4)) for m, c in zip(mean, calibrated)]

    def _calibrated(self, template: str, expected: float | None) -> float | None:
        from p5rec.eval.evaluation import apply_calibration

        line = self.calibration.get(template)
        if line is None or expected is None:
            return None
        return round(float(apply_calibration(expected, *line)), 4)

    def _expected_stars(self, role: str, default: str, requests: list[dict], records: list[dict]) -> list:
        from p5rec.eval.evaluation import expected_stars

        out: list = [None] * len(requests)
        for tid, idx in _by_template(requests, default).items():
            t = self._template(tid, role)
            if t.scoring != "generation" or "rating" not in t.target_variables:
                continue
            with family_route(self.model, t.family):
                stars = expected_stars(self.model, self.tokenizer, self._sources(t, [records[i] for i in idx]),
                                       max_source_length=self.max_source_length)
            for i, e in zip(idx, stars):
                out[i] = round(float(e), 4)
        return out

    def predict_rating(self, user: str, item: str, template: str | None = None) -> dict:
        """{"rating": greedy answer clipped to [1, 5] or None, "text": raw output, "expected": expected star,
        "calibrated": the expected star calibrated on validation, or None; "expected_mean", "calibrated_mean":
        the same averaged over the evaluated rating templates, or None}."""
        return self.predict_rating_batch([{"user": user, "item": item, "template": template}])[0]

    def explain_batch(self, requests: list[dict], num_beams: int | None = None) -> list[str]:
        """An explanation for each ``{"user", "item", "feature", "rating", "template"}`` (the family's
        ``explain_feature`` template when a feature word is given, else its ``explain`` one), decoded as the
        evaluation decodes text."""
        for r in requests:
            self._need_user(r["user"])
            self._check_items([r["item"]], field="item")
        requests = [dict(r, template=r.get("template") or self.default_template(
            "explain_feature" if r.get("feature") else "explain")) for r in requests]
        records = [{"user": r["user"], "item": r["item"], "feature": r.get("feature") or "", "rating": r.get("rating")}
                   for r in requests]
        return self._generate("explain", self.default_template("explain"), requests, records, text=True,
                              **_text_decoding(num_beams))

    def explain(self, user: str, item: str, feature: str | None = None, rating: float | None = None,
                template: str | None = None, num_beams: int | None = None) -> str:
        return self.explain_batch([{"user": user, "item": item, "feature": feature, "rating": rating,
                                    "template": template}], num_beams)[0]

    def _review_requests(self, requests: list[dict], role: str) -> tuple[list[dict], list[dict]]:
        """(requests with their template, records) for review prompts; a user the run does not know is named
        generically through the role's new-user template."""
        out, records = [], []
        for r in requests:
            tid = r.get("template") or self.default_template(role)
            rec = dict(self._user_fields(r.get("user"), None), review=r["review"])
            if "user" in self._template(tid, role).variables and not rec["user"]:
                tid = self.default_template(role, known_user=False)
            out.append(dict(r, template=tid))
            records.append(rec)
        return out, records

    def summarize_batch(self, requests: list[dict]) -> list[str]:
        """A summary (title) of each ``{"review": ..., "user": ..., "template": ...}``."""
        requests, records = self._review_requests(requests, "summarize")
        return self._generate("summarize", self.default_template("summarize"), requests, records, text=True,
                              **_text_decoding())

    def summarize(self, review: str, user: str | None = None, template: str | None = None) -> str:
        return self.summarize_batch([{"review": review, "user": user, "template": template}])[0]

    def rate_review_batch(self, requests: list[dict]) -> list[dict]:
        """Star rating read from each review; a new user goes through the role's new-user template (the review
        family's unseen user-name variant)."""
        requests, records = self._review_requests(requests, "rate_review")
        texts = self._generate("rate_review", self.default_template("rate_review"), requests, records,
                               max_new_tokens=6)
        return [self._rating_answer(t) for t in texts]

    def rate_review(self, review: str, user: str | None = None, template: str | None = None) -> dict:
        return self.rate_review_batch([{"review": review, "user": user, "template": template}])[0]

    # ------------------------------------------------------------------ request dicts (CLI / JSONL / HTTP)
    def answer(self, request: dict) -> dict:
        """Answer one request ``{"task": ..., ...}``; the result is JSON-serialisable.

        The request is checked first (:func:`check_request`): a missing or mistyped field is a
        :class:`RequestError` naming it, before any rendering or decoding."""
        return self._answer(check_request(request))

    def _answer(self, request: dict) -> dict:
        """``answer`` for a request :func:`check_request` has passed."""
        t0 = time.perf_counter()
        result = self._answer_group([request])[0]
        result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return result

    def answer_batch(self, requests: list[dict]) -> list[dict | Exception]:
        """Answers to requests :func:`check_request` has passed, decoded together where they can be: one batched
        call per task and settings (:func:`batch_key`). A request the run refuses (an unknown id, a template of
        another family) gets its exception in its place and never sinks the others: unknown ids are found first
        (:meth:`check_ids`), and a group that still fails is answered again one request at a time."""
        out: list[dict | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for n, r in enumerate(requests):
            try:
                self.check_ids(r)  # the common refusal, found before any group is decoded
            except UnknownIdError as exc:
                out[n] = exc
                continue
            groups.setdefault(batch_key(r), []).append(n)
        for idx in groups.values():
            try:
                answers = self._answer_group([requests[i] for i in idx])
            except REFUSED:
                answers = []
                for i in idx:
                    try:
                        answers.append(self._answer_group([requests[i]])[0])
                    except REFUSED as exc:
                        answers.append(exc)
            for i, a in zip(idx, answers):
                out[i] = a
        return out

    def _rank_answers(self, requests: list[dict]) -> list[list[dict]]:
        return [[asdict(p) for p in ps] for ps in self.rank_batch(requests)]

    def _answer_group(self, requests: list[dict]) -> list[dict]:
        """Answers to checked requests that share a :func:`batch_key` (the first one's settings apply)."""
        first = requests[0]
        task = first["task"]
        if task == "sequential":
            preds = self.recommend_batch(requests, int(first.get("k", 10)), first.get("template"),
                                         bool(first.get("exclude_history", True)))
            return [{"items": [asdict(p) for p in ps]} for ps in preds]
        handler = getattr(self, _HANDLERS[task][0])
        return [{_HANDLERS[task][1]: v} if _HANDLERS[task][1] else v for v in handler(requests)]


# task -> (batched P5Rec method, key of its answer; None: the method returns the answer dict)
_HANDLERS = {"direct": ("_rank_answers", "items"), "rank": ("_rank_answers", "items"),
             "rating": ("predict_rating_batch", None), "explanation": ("explain_batch", "explanation"),
             "review": ("summarize_batch", "summary"), "review_rating": ("rate_review_batch", None)}
# tasks whose prompt names the user by id: the user must be one the run knows
USER_TASKS = ("rating", "explanation")
# what a run may refuse about a request that passed check_request (an id it does not know, a template it lacks)
REFUSED = (UnknownIdError, RequestError, ValueError, KeyError)


def batch_key(request: dict) -> tuple:
    """Requests with the same key can be decoded in one batched call: the task, and for next-item requests the
    settings ``recommend_batch`` takes once for the batch (k, template, whether the history is excluded)."""
    if request["task"] == "sequential":
        return ("sequential", int(request.get("k", 10)), request.get("template"),
                bool(request.get("exclude_history", True)))
    return (request["task"],)


# ---------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    from p5rec.argtypes import int_at_least

    p = subparsers.add_parser("predict", help="answer requests with a trained run (raw ids in, raw ids out)")
    p.add_argument("--run", required=True, type=Path, help="run directory written by train.py")
    p.add_argument("--task", choices=["sequential", "direct", "rating", "explanation", "review", "review_rating"])
    p.add_argument("--user", help="raw user id (reviewer id)")
    p.add_argument("--item", help="raw item id (ASIN)")
    p.add_argument("--history", help="comma-separated raw item ids, oldest first")
    p.add_argument("--candidates", help="comma-separated raw item ids to rank")
    p.add_argument("--review", help="review text (review, review_rating tasks)")
    p.add_argument("--feature", help="feature word hint (explanation task)")
    p.add_argument("--rating", type=float, help="star rating shown by some explanation templates")
    p.add_argument("-k", type=int_at_least(1), default=10, help="items to recommend")
    p.add_argument("--template", help="template id (default: a seen template of the task)")
    p.add_argument("--keep-history", action="store_true", help="allow recommending items of the history")
    p.add_argument("--input", type=Path, help="JSON lines of requests ({'task': ..., ...}); batched")
    p.add_argument("--output", type=Path, help="write answers as JSON lines here (with --input); an existing file "
                   "only with --overwrite, never the --input file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=_cli)


def _request_from_args(args) -> dict:
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else []  # noqa: E731
    req = {"task": args.task, "user": args.user, "item": args.item, "history": split(args.history),
           "candidates": split(args.candidates), "review": args.review, "feature": args.feature,
           "rating": args.rating, "k": args.k, "template": args.template,
           "exclude_history": not args.keep_history}
    return {k: v for k, v in req.items() if v not in (None, [], "")}


def output_problem(output: Path, input_path: Path | None, overwrite: bool) -> str | None:
    """Why answers may not be written to ``output``, or None. Checked before the model is loaded, so a typo in
    the path costs nothing and the decoding is never thrown away: the file must not be the input (not even with
    ``overwrite``), must not exist unless ``overwrite``, and its directory must exist."""
    output = Path(output)
    source = Path(input_path) if input_path is not None else None
    if source is not None and (output.resolve() == source.resolve()
                               or (output.exists() and source.exists() and os.path.samefile(output, source))):
        return f"--output {output} is the --input file; write the answers to another file"
    if output.is_dir():
        return f"--output {output} is a directory; name a file"
    if output.exists() and not overwrite:
        return f"--output {output} exists; pass --overwrite to replace it"
    if not output.parent.is_dir():
        return f"--output {output}: directory {output.parent} does not exist"
    return None


def _cli(args) -> int:
    from p5rec.run import RunError

    if not args.input and not args.task:
        print("p5rec predict: give --task (or --input requests.jsonl)", file=sys.stderr)
        return 2
    if args.input and not args.input.is_file():
        print(f"p5rec predict: --input {args.input}: no such file", file=sys.stderr)
        return 2
    request = None
    if not args.input:
        try:  # a bad request is refused before the model is loaded
            request = check_request(_request_from_args(args))
        except RequestError as exc:
            print(f"p5rec predict: {exc}", file=sys.stderr)
            return 2
    if args.output is not None:
        problem = output_problem(args.output, args.input, args.overwrite)
        if problem:
            print(f"p5rec predict: {problem}", file=sys.stderr)
            return 2
    try:
        rec = P5Rec.from_pretrained(args.run)
    except (FileNotFoundError, RunError) as exc:
        print(f"p5rec predict: {exc}", file=sys.stderr)
        return 2
    if args.input:
        return _batch(rec, args)
    try:
        result = rec._answer(request)
    except (UnknownIdError, ValueError, KeyError) as exc:
        print(f"p5rec predict: {_message(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)
    return 0


def parse_lines(lines: Sequence[str]) -> tuple[list[tuple[int, dict]], dict[int, dict]]:
    """JSONL request lines -> (checked requests, errors), both keyed by 1-based line number; blank lines skipped.

    A line that is not JSON, not an object, or fails :func:`check_request` becomes ``{"line": N, "error": ...}``
    (with the parsed ``request`` when there is one) and does not stop the others."""
    requests: list[tuple[int, dict]] = []
    errors: dict[int, dict] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as exc:
            errors[n] = {"line": n, "error": f"line {n}: not JSON ({exc.msg}; column {exc.colno})"}
            continue
        except RecursionError:
            errors[n] = {"line": n, "error": f"line {n}: not JSON (nested too deeply)"}
            continue
        try:
            requests.append((n, check_request(request, n)))
        except RequestError as exc:
            errors[n] = {"line": n, "request": request, "error": str(exc)}
    return requests, errors


def _batch(rec: P5Rec, args) -> int:
    from tqdm.auto import tqdm

    try:
        lines = args.input.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"p5rec predict: --input {args.input}: unreadable ({exc})", file=sys.stderr)
        return 2
    requests, by_line = parse_lines(lines)
    if by_line:
        logger.warning("%d of %d request line(s) refused; their answers are error objects naming the line and "
                       "field", len(by_line), len(by_line) + len(requests))
    t0 = time.perf_counter()
    # Decoded in chunks (a progress bar, and one bad request only costs its chunk a retry), each chunk batched
    # by task and settings (P5Rec.answer_batch).
    chunk = 256
    for start in tqdm(range(0, len(requests), chunk), desc="requests", disable=None):
        part = requests[start : start + chunk]
        for (n, _), answer in zip(part, rec.answer_batch([r for _, r in part])):
            by_line[n] = {"error": f"line {n}: {_message(answer)}"} if isinstance(answer, Exception) else answer
    for n, r in requests:
        by_line[n] = {"line": n, "request": r, **by_line[n]}
    answers = [by_line[n] for n in sorted(by_line)]
    seconds = time.perf_counter() - t0
    out = "\n".join(json.dumps(a) for a in answers) + "\n"
    if args.output:
        atomic.write_text(args.output, out)  # a temporary sibling, then os.replace: never a half-written file
        print(f"{len(answers)} answers -> {args.output} ({len(answers) / max(seconds, 1e-9):.1f} requests/s)",
              file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0


def _message(exc: Exception) -> str:
    """An exception's text without the quotes ``str(KeyError)`` adds."""
    if isinstance(exc, KeyError) and not isinstance(exc, UnknownIdError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def _by_template(requests: list[dict], default: str) -> dict[str, list[int]]:
    """Request positions grouped by their ``template`` (``default`` where none is named), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for n, r in enumerate(requests):
        groups.setdefault(r.get("template") or default, []).append(n)
    return groups


def _print_human(result: dict) -> None:
    if "items" in result:
        for rank, p in enumerate(result["items"], 1):
            print(f"{rank:3d}. {p['item']}  (log p = {p['score']:.3f})")
    else:
        for k, v in result.items():
            if k != "latency_ms":
                print(f"{k}: {v}")
    print(f"({result['latency_ms']} ms)")


def _text_decoding(num_beams: int | None = None) -> dict:
    """The evaluation's text decoding (``EvalConfig.text_*``), so that a served explanation is the one scored."""
    from p5rec.eval.evaluation import EvalConfig

    cfg = EvalConfig()
    return dict(num_beams=num_beams or cfg.text_beams, no_repeat_ngram_size=cfg.text_no_repeat_ngram,
                repetition_penalty=cfg.text_repetition_penalty)
