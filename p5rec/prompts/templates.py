"""Prompt templates: load, validate and render ``tasks/<family>/templates.yaml``.

Prompts are data (docs/design.md §4). Each YAML file holds one family: the prepared table it reads
(``data``), the ``schema`` of fields a record offers to Jinja, and a list of templates (id, name, seen,
scoring, answer_choices, fields, source, target). This module

* loads them into a :class:`TemplateSet`, compiled once by a Jinja environment owned by that set
  (``StrictUndefined``: a misspelt field fails loudly instead of rendering as "");
* validates a file (:func:`validate`) and reports each problem with file, line and template id;
* renders a prepared split into ``source/target`` rows (:func:`render_split`) or explicit records
  (:func:`render_records`, :func:`make_context`), turning raw ids into id surfaces (design.md §3).

Randomness (which template, yes/no negatives, candidate lists, the star asked about) comes from one
``numpy.random.default_rng(config.seed)`` per :func:`render_split` call, so a seed fixes the rows.
"""

from __future__ import annotations

import logging
import gc
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
import numpy as np
import yaml

from p5rec.prompts.families import FamilySpec, parse_spec, tasks_root

logger = logging.getLogger(__name__)

__all__ = [
    "FIELDS",
    "FamilyInfo",
    "SCORING_KINDS",
    "PreviewError",
    "Problem",
    "RenderConfig",
    "Template",
    "TemplateError",
    "TemplateSet",
    "add_cli",
    "item_titles",
    "load_templates",
    "make_context",
    "preview_rows",
    "render_records",
    "render_split",
    "shipped_files",
    "validate",
]

SCORING_KINDS = ("generation", "choice", "candidate_ranking", "pointwise", "pairwise", "listwise", "sequence")
# ``sequence``: the target is the user's item sequence (``{{ sequence | ids }}``) and the prompt names no item, so
# teacher forcing gives a next-item loss at every decoder position (SASRec's training signal in P5's frame);
# evaluated by continuing the decoder from the history (the ``continuation`` protocol)
SEQUENCE_SCORING = "sequence"
# fields that name items: a sequence template's source may use none of them (its target would leak into the encoder)
ITEM_FIELDS = frozenset({"history", "history_titles", "sequence", "target", "target_title", "item", "item_title",
                         "candidates", "candidate_titles", "ranked_candidates"})
# scoring kinds whose target is one of a fixed set of strings: answer_choices is required
CHOICE_SCORING = ("choice", "pointwise")
# fields that only exist when the dataset has item metadata (titles)
TITLE_FIELDS = frozenset({"item_title", "target_title", "history_titles", "candidate_titles"})
# fields backed by record data that may be missing (NaN rating, empty text): a template listing one of them
# in ``fields`` is not rendered for a record that lacks it (the row is dropped and counted)
DATA_FIELDS = ("rating", "feature", "explanation", "review", "summary")
# fields that mean "this template shows a candidate list"
CANDIDATE_FIELDS = frozenset({"candidates", "candidate_titles", "ranked_candidates"})
ROW_COLUMNS = ("source", "target", "template", "family", "user", "item", "answer", "candidates")


class TemplateError(ValueError):
    """A template file cannot be loaded; ``problems`` lists why."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Problem:
    """One validation finding. ``line`` is the 1-based line of the template entry (or of the error)."""

    file: str
    line: int
    template: str  # template id, "" for file-level problems
    kind: str  # yaml, format, schema, family, jinja, sandbox, undefined_variable, undeclared_field, unknown_field,
    # duplicate_id, duplicate_name, missing_source, missing_target, unknown_scoring, answer_choices, render
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.template}] {self.kind}: {self.message}"


@dataclass
class Template:
    """One prompt. ``source``/``target`` are the Jinja text; the compiled forms live on the instance."""

    id: str
    name: str
    family: str
    seen: bool
    scoring: str
    answer_choices: list[str] | None
    fields: list[str]
    source: str
    target: str
    file: str
    line: int
    weight: float | None = None  # sampling weight among its family's templates in training (None: the default)
    variables: frozenset[str] = field(default=frozenset(), repr=False)  # fields used by source or target
    target_variables: frozenset[str] = field(default=frozenset(), repr=False)
    _source: jinja2.Template | None = field(default=None, repr=False, compare=False)
    _target: jinja2.Template | None = field(default=None, repr=False, compare=False)
    _target_var: str | None = field(default=None, repr=False, compare=False)  # target is just "{{ var }}"

    @property
    def needs_titles(self) -> bool:
        """True for item-title variants: renderable only on datasets with item metadata."""
        return bool((self.variables | set(self.fields)) & TITLE_FIELDS)

    @property
    def answers_item(self) -> bool:
        """The answer is an item (the record's target) rather than a fixed choice or free text."""
        return not self.answer_choices and bool(self.target_variables & {"target", "ranked_candidates"})

    def render(self, context: Mapping[str, Any]) -> tuple[str, str]:
        """(source, target) for a context built by :func:`make_context`; whitespace stripped."""
        if self._target_var is not None:  # most targets: skip Jinja's per-render Context
            return _render(self._source, context), str(context[self._target_var]).strip()
        return _render(self._source, context), _render(self._target, context)


def _render(tmpl: jinja2.Template, context: Mapping[str, Any]) -> str:
    """``tmpl.render(context)`` without copying the context into a fresh dict with the globals (a third of
    the render time); the templates use no globals, only the context and the environment's filters."""
    try:
        return tmpl.environment.concat(tmpl.root_render_func(tmpl.new_context(context, shared=True))).strip()
    except Exception:
        tmpl.environment.handle_exception()  # re-raises with the template's line in the traceback


# ---------------------------------------------------------------------------------------------- fields
# What the renderer offers a template: field name -> builder(renderer, raw record). A family's YAML
# schema picks a subset; validation rejects schema fields missing here. Ids become surfaces through
# the renderer's per-call caches, so each raw id is converted once per render call.


def _fmt_rating(value: Any) -> str:
    """4.0 -> "4", 4.5 -> "4.5"; None/NaN/"" -> "" (implicit data has no rating)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    value = float(value)
    if math.isnan(value):
        return ""
    value = round(value, 2)
    return str(int(value)) if value == int(value) else f"{value:g}"


def _history(r: "_Renderer", rec: dict) -> list[str]:
    hist = rec.get("history") or ()
    if r.config.max_history:
        hist = hist[-r.config.max_history :]
    items = r.items
    return [items[h] for h in hist]


def _sequence(r: "_Renderer", rec: dict) -> list[str]:
    """History then target, the most recent ``max_sequence`` items: the whole known sequence of the record."""
    seq = list(rec.get("history") or ())
    if rec.get("target"):
        seq.append(rec["target"])
    if r.config.max_sequence:
        seq = seq[-r.config.max_sequence :]
    items = r.items
    return [items[h] for h in seq]


def _history_titles(r: "_Renderer", rec: dict) -> list[str]:
    hist = rec.get("history") or ()
    if r.config.title_history:
        hist = hist[-r.config.title_history :]
    return [r.title(h) for h in hist]


def _ranked(r: "_Renderer", rec: dict) -> list[str]:
    """The candidate list reordered with the target first (the listwise target); others keep their order."""
    target = rec.get("target") or ""
    cands = rec.get("candidates") or ()
    rest = [c for c in cands if c != target]
    return [r.items[c] for c in ([target] if target else []) + rest]


def _words(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    if limit and text.count(" ") >= limit:
        parts = text.split()
        if len(parts) > limit:
            return " ".join(parts[:limit])
    return text


FIELDS: dict[str, tuple[str, Callable[["_Renderer", dict], Any]]] = {
    "user": ("user id surface", lambda r, x: r.users[x["user"]]),
    "user_name": (
        "reviewer name; the user surface when the dataset has none (or users are anonymous)",
        lambda r, x: r.users[x["user"]] if r.config.anonymous_users
        else x.get("user_name") or r.names.get(x["user"]) or r.users[x["user"]],
    ),
    "item": ("surface of the item asked about", lambda r, x: r.items[x["item"]] if x.get("item") else ""),
    "item_title": ("title of the item asked about", lambda r, x: r.title(x.get("item"))),
    "target": ("surface of the target item", lambda r, x: r.items[x["target"]] if x.get("target") else ""),
    "target_title": ("title of the target item", lambda r, x: r.title(x.get("target"))),
    "history": ("list: surfaces of the most recent items, oldest first", _history),
    "history_titles": ("list: titles of the most recent items, oldest first", _history_titles),
    "sequence": ("list: the most recent items ending with the target, oldest first (max_sequence)", _sequence),
    "candidates": ("list: candidate item surfaces", lambda r, x: list(map(r.items.__getitem__, x.get("candidates") or ()))),
    "candidate_titles": ("list: candidate titles", lambda r, x: [r.title(c) for c in x.get("candidates") or ()]),
    "ranked_candidates": ("list: candidate surfaces, target first", _ranked),
    "rating": ('star rating as text ("4", "4.5")', lambda r, x: _fmt_rating(x.get("rating"))),
    "star": ("star value a yes/no question asks about", lambda r, x: _fmt_rating(x.get("star"))),
    "feature": ("feature word of the explanation", lambda r, x: x.get("feature") or ""),
    "explanation": ("explanation sentence", lambda r, x: x.get("explanation") or ""),
    "review": ("review text (first max_review_words words)", lambda r, x: _words(x.get("review"), r.config.max_review_words)),
    "summary": ("review summary", lambda r, x: x.get("summary") or ""),
}


# ---------------------------------------------------------------------------------------------- jinja
@jinja2.pass_context
def _ids_filter(context, values: Iterable[str]) -> str:
    """Join id surfaces: no separator in token form (each id is one token), " , " in text form (P5's)."""
    return context.get("id_sep", " , ").join(values)


def _titles_filter(values: Iterable[str]) -> str:
    return " ; ".join(values)


def _new_env() -> jinja2.Environment:
    """The Jinja environment every template is compiled by: sandboxed, strict about undefined names.

    Template files are shared data, so a template must not reach Python: ``{{ cycler.__init__.__globals__ ...}}``
    in a plain environment runs whatever it likes while ``validate`` renders it. Jinja's immutable sandbox refuses
    attributes that start with ``_`` and other internals, and every method that mutates a list or dict, raising
    :class:`jinja2.exceptions.SecurityError`; compiled code goes through the environment's ``getattr``/``call``
    for every attribute and call, so the fast path of :func:`_render` is checked as well as ``render()``.
    """
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                        keep_trailing_newline=False)
    env.filters["ids"] = _ids_filter
    env.filters["titles"] = _titles_filter
    return env


def _unsafe_access(ast: jinja2.nodes.Template) -> list[str]:
    """Attribute names a template reaches for that the sandbox would refuse, found without rendering it.

    A render only shows the branches its records take; this finds ``x.__class__``, ``x['__class__']`` and
    ``x | attr('__class__')`` anywhere in the source (names starting with ``_``, which no field offers), so
    loading refuses the template before anything renders it. Names computed at render time are left to the
    sandbox, which :func:`validate` reports as ``sandbox`` problems too.
    """
    found: list[str] = []
    for node in ast.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem, jinja2.nodes.Filter)):
        if isinstance(node, jinja2.nodes.Getattr):
            name = node.attr
        elif isinstance(node, jinja2.nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, jinja2.nodes.Const) else None
        else:
            arg = node.args[0] if node.name == "attr" and node.args else None
            name = arg.value if isinstance(arg, jinja2.nodes.Const) else None
        if isinstance(name, str) and name.startswith("_") and name not in found:
            found.append(name)
    return found[::-1]  # find_all visits the outermost access of a chain first


# ---------------------------------------------------------------------------------------------- loading
# A family's header (the table it reads, its protocols, defaults): p5rec.prompts.families. The old name stays for callers.
FamilyInfo = FamilySpec


def shipped_files(families: Sequence[str] | None = None) -> list[Path]:
    """The shipped ``tasks/<family>/templates.yaml`` files, sorted by family."""
    root = tasks_root()
    out = []
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        f = d / "templates.yaml"
        if f.is_file() and (families is None or d.name in families):
            out.append(f)
    return out


def _parse_file(path: Path, env: jinja2.Environment,
                text: str | None = None) -> tuple[FamilyInfo | None, list[Template], list[Problem]]:
    """Parse and compile one file (``text``, when given, is its content, not yet written: the studio's draft);
    problems that stop a template from compiling drop that template."""
    fname = str(path)
    problems: list[Problem] = []

    def bad(line, tid, kind, msg):
        problems.append(Problem(fname, line, tid, kind, msg))

    try:
        if text is None:
            text = Path(path).read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except OSError as e:
        bad(0, "", "yaml", f"cannot read: {e}")
        return None, [], problems
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        bad(mark.line + 1 if mark else 0, "", "yaml", str(e).replace("\n", " "))
        return None, [], problems
    if not isinstance(data, dict):
        bad(1, "", "format", "top level must be a mapping with family, data, schema, templates")
        return None, [], problems

    fam = data.get("family")
    schema = data.get("schema")
    entries = data.get("templates")
    if not isinstance(fam, str) or not fam:
        bad(1, "", "format", "missing 'family'")
        return None, [], problems
    if not isinstance(schema, dict):
        bad(1, "", "format", "missing 'schema' mapping (field name -> description)")
        schema = {}
    if not isinstance(entries, list):
        bad(1, "", "format", "missing 'templates' list")
        entries = []
    for key in schema:
        if key not in FIELDS:
            bad(_key_line(node, "schema"), "", "schema", f"schema field {key!r} is not offered by the renderer; known: {sorted(FIELDS)}")
    info, spec_problems = parse_spec(data, fname, _key_line(node, "data" if "data" in data else "family"))
    for msg in spec_problems:  # "<field>: <expected>"; the line is the field's top-level key
        bad(_key_line(node, msg.split(".", 1)[0].split(":", 1)[0]), "", "family", msg)

    lines = _entry_lines(node)
    templates: list[Template] = []
    seen_ids: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    for i, entry in enumerate(entries):
        line = lines[i] if i < len(lines) else 0
        if not isinstance(entry, dict):
            bad(line, "", "format", "template entry must be a mapping")
            continue
        tid = str(entry.get("id") or "")
        if not tid:
            bad(line, "", "format", "template without 'id'")
            continue
        if tid in seen_ids:
            bad(line, tid, "duplicate_id", f"id {tid!r} already used at line {seen_ids[tid]}")
            continue
        seen_ids[tid] = line
        name = str(entry.get("name") or "")
        if not name:
            bad(line, tid, "format", "template without 'name'")
        elif name in seen_names:
            bad(line, tid, "duplicate_name", f"name {name!r} already used at line {seen_names[name]}")
        else:
            seen_names[name] = line
        source, target = entry.get("source"), entry.get("target")
        ok = True
        if not isinstance(source, str) or not source.strip():
            bad(line, tid, "missing_source", "'source' is missing or empty")
            ok = False
        if not isinstance(target, str) or not target.strip():
            bad(line, tid, "missing_target", "'target' is missing or empty")
            ok = False
        scoring = entry.get("scoring")
        if scoring not in SCORING_KINDS:
            bad(line, tid, "unknown_scoring", f"scoring {scoring!r} is not one of {list(SCORING_KINDS)}")
        seen = entry.get("seen")
        if not isinstance(seen, bool):
            bad(line, tid, "format", "'seen' must be true or false")
        choices = entry.get("answer_choices")
        if choices is not None and (not isinstance(choices, list) or not choices):
            bad(line, tid, "answer_choices", "answer_choices must be a non-empty list")
            choices = None
        if scoring in CHOICE_SCORING and not choices:
            bad(line, tid, "answer_choices", f"scoring {scoring!r} needs answer_choices")
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            bad(line, tid, "format", "'weight' must be a positive number (its share among the family's templates "
                "in training; 1 when left out)")
            weight = None
        fields = entry.get("fields") or []
        if not isinstance(fields, list):
            bad(line, tid, "format", "'fields' must be a list")
            fields = []
        for f in fields:
            if f not in schema:
                bad(line, tid, "unknown_field", f"field {f!r} is not in the {fam} schema")
        if not ok:
            continue

        compiled, used = {}, {}
        for part, body in (("source", source), ("target", target)):
            try:
                ast = env.parse(body)
                unsafe = _unsafe_access(ast)
                if unsafe:
                    bad(line, tid, "sandbox", f"{part}: reaches for {', '.join(map(repr, unsafe))}; templates may "
                        "only use the schema's fields and filters (attributes starting with '_' are refused)")
                    continue
                used[part] = jinja2.meta.find_undeclared_variables(ast)
                compiled[part] = env.from_string(body)
            except jinja2.TemplateSyntaxError as e:
                bad(line, tid, "jinja", f"{part}: {e.message} (line {e.lineno} of the {part})")
            except jinja2.TemplateError as e:  # e.g. an unknown filter (TemplateAssertionError)
                bad(line, tid, "jinja", f"{part}: {e}")
        if len(compiled) < 2:
            continue
        variables = used["source"] | used["target"]
        undefined = sorted(v for v in variables if v not in schema)
        if undefined:
            bad(line, tid, "undefined_variable", f"uses {', '.join(undefined)}, not in the {fam} schema")
            continue
        undeclared = sorted(v for v in variables if v not in fields)
        if undeclared:
            bad(line, tid, "undeclared_field", f"uses {', '.join(undeclared)} but does not list it in 'fields'")
        if scoring == SEQUENCE_SCORING:
            leak = sorted(used["source"] & ITEM_FIELDS)
            if leak:
                bad(line, tid, "sequence_leak", f"a sequence template's source may name no item (it uses "
                    f"{', '.join(leak)}): the decoder learns the sequence, the encoder only sees who asks")
            if used["target"] != {"sequence"}:
                bad(line, tid, "sequence_target", "a sequence template's target must be the item sequence, "
                    "'{{ sequence | ids }}'")
        templates.append(
            Template(
                id=tid, name=name, family=fam, seen=bool(seen), scoring=str(scoring),
                answer_choices=[str(c) for c in choices] if choices else None,
                fields=[str(f) for f in fields], source=source, target=target, file=fname, line=line,
                weight=None if weight is None else float(weight), variables=frozenset(variables),
                target_variables=frozenset(used["target"]),
                _source=compiled["source"], _target=compiled["target"],
                _target_var=m.group(1) if (m := _BARE_VAR.match(target)) else None,
            )
        )
    ids = set(seen_ids)
    for role, pair in info.inference.items():
        for tid in dict.fromkeys(pair):
            if tid not in ids:
                bad(_key_line(node, "inference"), "", "family",
                    f"inference.{role}: expected a template id of this file, got {tid!r}")
    return info, templates, problems


_BARE_VAR = re.compile(r"^\s*\{\{\s*([A-Za-z_]\w*)\s*\}\}\s*$")


def _entry_lines(node: yaml.Node | None) -> list[int]:
    """1-based line of each entry of the top-level ``templates`` sequence."""
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, v in node.value:
        if getattr(k, "value", None) == "templates" and isinstance(v, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in v.value]
    return []


def _key_line(node: yaml.Node | None, key: str) -> int:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == key:
                return k.start_mark.line + 1
    return 1


class TemplateSet:
    """Templates of one or more families, compiled by the set's own Jinja environment. Read-only."""

    def __init__(self, templates: list[Template], families: dict[str, FamilyInfo], env: jinja2.Environment):
        self._templates = list(templates)
        self._by_id = {t.id: t for t in self._templates}
        self._families = dict(families)
        self.env = env

    def __iter__(self) -> Iterator[Template]:
        return iter(self._templates)

    def __len__(self) -> int:
        return len(self._templates)

    def __contains__(self, tid: str) -> bool:
        return tid in self._by_id

    def get(self, tid: str) -> Template:
        try:
            return self._by_id[tid]
        except KeyError:
            raise KeyError(f"no template {tid!r}; known: {', '.join(self._by_id)}") from None

    def by_family(self, family: str) -> list[Template]:
        return [t for t in self._templates if t.family == family]

    def seen(self) -> list[Template]:
        return [t for t in self._templates if t.seen]

    def unseen(self) -> list[Template]:
        return [t for t in self._templates if not t.seen]

    @property
    def families(self) -> list[str]:
        return list(self._families)

    def family_info(self, family: str) -> FamilyInfo:
        try:
            return self._families[family]
        except KeyError:
            raise KeyError(f"no template family {family!r}; loaded: {', '.join(self._families)}") from None


def load_templates(
    paths: Sequence[str | Path] | None = None,
    families: Sequence[str] | None = None,
    include_shipped: bool | None = None,
    texts: Mapping[str, str] | None = None,
) -> TemplateSet:
    """Load the shipped families (all, or ``families``) plus the user files in ``paths``.

    ``include_shipped`` defaults to True; pass False to load only ``paths``. ``texts`` adds files not written
    yet (file name -> YAML text), loaded after ``paths``. Raises :class:`TemplateError` listing every structural
    problem (bad YAML/Jinja, unknown fields, duplicate ids across files).
    Rendering checks on synthetic records (answer_choices) are left to :func:`validate`.
    """
    if include_shipped is None:
        include_shipped = True
    files: list[tuple[Path, str | None]] = [(f, None) for f in (shipped_files(families) if include_shipped else [])]
    files += [(Path(p), None) for p in paths or ()]
    files += [(Path(name), text) for name, text in (texts or {}).items()]
    env = _new_env()
    all_templates: list[Template] = []
    infos: dict[str, FamilyInfo] = {}
    problems: list[Problem] = []
    where: dict[str, Template] = {}
    for f, text in files:
        info, ts, probs = _parse_file(f, env, text)
        problems += probs
        if info is None:
            continue
        if families is not None and info.family not in families:
            continue
        prev = infos.get(info.family)
        # a user file may add templates to a shipped family: same table, schema a subset of its schema
        if prev is not None and (prev.data != info.data or not set(info.schema) <= set(prev.schema)):
            problems.append(Problem(str(f), 1, "", "schema", f"family {info.family!r} is defined by {prev.file} "
                                    f"(data {prev.data!r}, fields {sorted(prev.schema)}); this file must match"))
        if prev is not None and info.declared:
            problems.append(Problem(str(f), 1, "", "family", f"{', '.join(sorted(info.declared))}: family "
                                    f"{info.family!r} is declared by {prev.file}; this file may only add templates"))
        if prev is None:
            for role in info.inference:
                other = next((i for i in infos.values() if role in i.inference), None)
                if other is not None:
                    problems.append(Problem(str(f), 1, "", "family", f"inference.{role}: already declared by "
                                            f"family {other.family!r} ({other.file}); one family per role"))
        infos.setdefault(info.family, info)
        for t in ts:
            if t.id in where:
                o = where[t.id]
                problems.append(Problem(t.file, t.line, t.id, "duplicate_id", f"id also defined at {o.file}:{o.line}"))
                continue
            where[t.id] = t
            all_templates.append(t)
    if problems:
        raise TemplateError(problems)
    return TemplateSet(all_templates, infos, env)


# ---------------------------------------------------------------------------------------------- validation
class _SyntheticIndex:
    """Index stand-in for validation: raw "7" -> "<i7>" / "item_7"."""

    def user_text(self, raw: str, form: str = "token") -> str:
        return f"<u{raw}>" if form == "token" else f"user_{raw}"

    def item_text(self, raw: str, form: str = "token") -> str:
        return f"<i{raw}>" if form == "token" else f"item_{raw}"


def _synthetic_records() -> list[dict]:
    """Records covering each branch a target may take: yes and no, every star, liked and not."""
    hist = ["1", "2", "3"]
    cands = ["4", "5", "6", "7", "8"]
    base = dict(history=hist, candidates=cands, feature="battery", explanation="the battery lasts long",
                review="great phone and the battery lasts for days", summary="long battery")
    out = []
    for k, rating in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 4.5]):
        pos = k % 2 == 0
        target = cands[k % len(cands)]
        out.append(dict(base, user=str(k), user_name="" if k == 3 else f"Name{k}", target=target,
                        item=target if pos else "9", rating=rating, star=rating if pos else (rating % 5) + 1))
    return out


_SYNTHETIC_TITLES = {str(i): f"Title number {i}" for i in range(10)}


def validate(path: str | Path, against_shipped: bool | None = None, text: str | None = None) -> list[Problem]:
    """Every problem in one templates.yaml, each with file, line of the template entry and template id.
    ``text``, when given, is validated as the content of ``path`` (which need not exist: the studio's draft).

    Besides what loading checks, renders each template on synthetic records in both id forms: a render
    error, an empty source or target, a target outside ``answer_choices``, or a template the sandbox stops
    (kind ``sandbox``) is a problem. A file that is not one of the shipped files is also checked for ids
    clashing with the shipped templates (``against_shipped``), and a family that is not shipped must read a
    prepared table (``data:``), or nothing could ever render it.
    """
    path = Path(path)
    env = _new_env()
    info, templates, problems = _parse_file(path, env, text)
    if info is not None:
        problems += _family_problems(info)
    shipped = {p.resolve() for p in shipped_files()}
    if against_shipped is None:
        against_shipped = path.resolve() not in shipped
    if against_shipped:
        others: dict[str, str] = {}
        for f in shipped:
            _, ts, _ = _parse_file(f, _new_env())
            others.update({t.id: f"{t.file}:{t.line}" for t in ts})
        for t in templates:
            if t.id in others:
                problems.append(Problem(t.file, t.line, t.id, "duplicate_id", f"id also defined by shipped template at {others[t.id]}"))
    records = _synthetic_records()
    for t in templates:
        for form in ("token", "text"):
            cfg = RenderConfig(id_form=form)
            try:
                outs = render_records(t, records, _SyntheticIndex(), cfg, titles=_SYNTHETIC_TITLES)
            except SecurityError as e:
                problems.append(Problem(t.file, t.line, t.id, "sandbox", f"refused by the template sandbox: {e}"))
                break
            except Exception as e:  # noqa: BLE001 - any render failure is reported, not raised
                problems.append(Problem(t.file, t.line, t.id, "render", f"{type(e).__name__}: {e}"))
                break
            if any(not src for src, _ in outs):
                problems.append(Problem(t.file, t.line, t.id, "render", "source renders empty on a synthetic record"))
                break
            if any(not tgt for _, tgt in outs):
                problems.append(Problem(t.file, t.line, t.id, "render", "target renders empty on a synthetic record"))
                break
            if t.answer_choices:
                bad = sorted({tgt for _, tgt in outs if tgt not in t.answer_choices})
                if bad:
                    problems.append(Problem(t.file, t.line, t.id, "answer_choices",
                                            f"target produces {bad}, not among answer_choices {t.answer_choices}"))
                    break
    problems.sort(key=lambda p: (p.line, p.template, p.kind))
    return problems


def _family_problems(info: FamilyInfo) -> list[Problem]:
    """A family that no shipped file defines must name, in ``data:``, a table that ``p5rec data prepare`` writes.

    (``data`` defaults to the family's name, so a new family without it reads a table that does not exist.)
    """
    from p5rec.data.prepare import FAMILY_DIRS  # the tables a prepared dataset offers, by the name family() takes

    known = {f.parent.name for f in shipped_files()} | set(FAMILY_DIRS)
    if info.family in known or info.data in FAMILY_DIRS:
        return []
    return [Problem(info.file, info.line, "", "family",
                    f"family {info.family!r} is not a known family ({', '.join(sorted(known))}) and its data "
                    f"{info.data!r} is not a prepared table; set 'data:' to one of {', '.join(FAMILY_DIRS)}")]


# ---------------------------------------------------------------------------------------------- rendering
@dataclass
class RenderConfig:
    """How prepared records become rows. Saved with the run (JSON-serialisable)."""

    seed: int = 42
    id_form: str = "token"  # "token" (<i5>) or "text" (item_5), design.md §3
    max_history: int = 20  # most recent items shown (0 = all)
    renders: dict[str, int] = field(default_factory=dict)  # train renders per record, per family (default 1)
    # ``sequence`` templates: items in the target sequence (SASRec's max_len), and training rows per user (their
    # record is the user's whole training sequence, not one position of it)
    max_sequence: int = 50
    sequence_renders: int = 1
    template_weights: dict[str, float] = field(default_factory=dict)  # template id -> sampling weight (default 1)
    include_unseen: bool = False  # unseen templates are rendered only when named in template_ids or this is True
    template_ids: list[str] | None = None  # restrict to these ids (named unseen ones included)
    n_candidates: int = 100  # candidate_ranking list size in training (eval uses the saved 100)
    n_list: int = 5  # listwise list size
    yes_ratio: float = 0.5  # share of yes/no renders asking about the positive
    title_history: int = 5  # titles shown by history_titles
    max_title_words: int = 12
    max_review_words: int = 64
    all_templates_on_eval: bool = True  # valid/test: every selected template once per record (per-template metrics)
    max_records: int | None = None  # render only the first N records of a split (previews, smoke runs)
    # every user renders as ANONYMOUS_USER: prompts carry only the history, no user id and no user vocabulary
    # (SASRec's setting; P5's per-user tokens are rarely trained when users have few interactions each)
    anonymous_users: bool = False

    def __post_init__(self):
        if self.id_form not in ("token", "text"):
            raise ValueError(f"id_form must be 'token' or 'text', not {self.id_form!r}")
        if not 0.0 <= self.yes_ratio <= 1.0:
            raise ValueError("yes_ratio must be in [0, 1]")
        if self.n_list < 2 or self.n_candidates < 2:
            raise ValueError("n_list and n_candidates must be at least 2")


ANONYMOUS_USER = "a user"


class _SurfaceMap(dict):
    """raw id -> surface, computed once per id on first use."""

    def __init__(self, fn: Callable[[str, str], str], form: str):
        super().__init__()
        self._fn, self._form = fn, form

    def __missing__(self, raw: str) -> str:
        value = self[raw] = self._fn(raw, self._form)
        return value


class _Renderer:
    """Per-call state: surface caches, titles, user names and the config."""

    def __init__(self, index, config: RenderConfig, titles: Mapping[str, str] | None = None,
                 names: Mapping[str, str] | None = None):
        self.config = config
        self.users = _SurfaceMap(
            (lambda raw, form: ANONYMOUS_USER) if config.anonymous_users else index.user_text, config.id_form
        )
        self.items = _SurfaceMap(index.item_text, config.id_form)
        self.titles = titles or {}
        self.names = names or {}
        self._title_cache: dict[str, str] = {}
        self.sep = "" if config.id_form == "token" else " , "

    def title(self, raw: str | None) -> str:
        """Item title (first max_title_words words); an item without a title falls back to its surface."""
        if not raw:
            return ""
        t = self._title_cache.get(raw)
        if t is None:
            t = self.titles.get(raw)
            t = _words(t, self.config.max_title_words) if t else self.items[raw]
            self._title_cache[raw] = t
        return t

    def context(self, record: dict, names: Iterable[str]) -> dict:
        ctx = {n: FIELDS[n][1](self, record) for n in names}
        ctx["id_sep"] = self.sep
        return ctx


def make_context(family: str, record: Mapping[str, Any], index, config: RenderConfig | None = None,
                 titles: Mapping[str, str] | None = None, fields: Iterable[str] | None = None) -> dict:
    """The Jinja context of one raw record (raw ids, as in the prepared tables).

    Record keys (all optional but ``user``): user, user_name, item, target, history, candidates, rating,
    star, feature, explanation, review, summary; ``titles`` maps raw item -> title. Returns the fields of
    ``family``'s shipped schema (or ``fields``; every renderer field if the family is not shipped).
    """
    config = config or RenderConfig()
    if fields is None:
        fields = _shipped_schema(family) or FIELDS
    return _Renderer(index, config, titles).context(dict(record), fields)


def _shipped_schema(family: str) -> tuple[str, ...]:
    """Field names of a shipped family's schema (files are package data: read once per process)."""
    from p5rec.prompts.families import shipped_specs

    spec = shipped_specs().get(family)
    return tuple(spec.schema) if spec else ()


def render_records(template: Template, records: Sequence[Mapping[str, Any]], index,
                   config: RenderConfig | None = None, titles: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(source, target) for explicit records: evaluation (a yes/no template once per candidate with the
    record's ``item``) and inference (arbitrary requests). Nothing is sampled: the record says it all."""
    r = _Renderer(index, config or RenderConfig(), titles)
    names = sorted(template.variables)
    return [template.render(r.context(dict(rec), names)) for rec in records]


def _features():
    import datasets

    return datasets.Features({c: datasets.Value("string") for c in ROW_COLUMNS[:-1]}
                             | {"candidates": datasets.List(datasets.Value("string"))})


def _select(templates, family: str, config: RenderConfig) -> list[Template]:
    ts = templates.by_family(family)
    if config.template_ids is not None:
        wanted = set(config.template_ids)
        return [t for t in ts if t.id in wanted]
    return [t for t in ts if t.seen or config.include_unseen]


def _columns(ds, names: Sequence[str]) -> dict[str, list]:
    """Whole columns as Python lists in one Arrow conversion (iterating a datasets Column is row by row)."""
    return ds.select_columns(list(names))[:] if len(ds) else {n: [] for n in names}


def item_titles(prepared) -> dict[str, str]:
    """raw item -> title from ``prepared.items`` ({} when the dataset has no titles)."""
    items = getattr(prepared, "items", None)
    if items is None or "title" not in getattr(items, "column_names", ()):
        return {}
    cols = _columns(items, ["item", "title"])
    return {i: t for i, t in zip(cols["item"], cols["title"]) if t}


def _names_of(prepared) -> dict[str, str]:
    inter = getattr(prepared, "interactions", None)
    if inter is None or "user_name" not in getattr(inter, "column_names", ()):
        return {}
    names: dict[str, str] = {}
    cols = _columns(inter, ["user", "user_name"])
    for u, n in zip(cols["user"], cols["user_name"]):
        if n:
            names[u] = n
    return names


class _Negatives:
    """Items a user never touched, drawn uniformly from the catalogue by rejection.

    Random catalogue positions come from a buffer filled by one ``rng.integers`` call per 65k draws:
    a numpy call per row would cost more than the rest of the row.
    """

    def __init__(self, prepared, rng: np.random.Generator):
        self.prepared = prepared
        self.rng = rng
        self._buf: list[int] = []
        self._pos = 0
        self._loaded = False

    def _load(self) -> None:  # on first use: eval splits and templates without negatives never pay for it
        self.cat = list(self.prepared.catalogue)
        self.user_items = self.prepared.user_items()
        self._loaded = True

    def _positions(self, m: int) -> list[int]:
        if self._pos + m > len(self._buf):
            self._buf = self.rng.integers(0, len(self.cat), size=max(m, 1 << 16)).tolist()
            self._pos = 0
        out = self._buf[self._pos : self._pos + m]
        self._pos += m
        return out

    def draw(self, user: str, k: int, exclude: Iterable[str] = ()) -> list[str]:
        if not self._loaded:
            self._load()
        touched = self.user_items.get(user, set())
        banned = set(exclude)
        cat = self.cat
        k = min(k, max(0, len(cat) - len(touched) - sum(1 for b in banned if b not in touched)))
        out: list[str] = []
        for _ in range(50):
            if len(out) >= k:
                break
            drawn = dict.fromkeys([cat[j] for j in self._positions(k - len(out) + 8)])
            new = [it for it in drawn if it not in touched and it not in banned][: k - len(out)]
            if len(out) + len(new) < k:
                banned.update(new)
            out += new
        return out


class _SavedCandidates:
    """user -> the saved 100 candidates of the split (:meth:`PreparedDataset.saved_candidates`), read on first use."""

    def __init__(self, prepared, split: str):
        self.prepared, self.split = prepared, split

    def get(self, user: str) -> list[str] | None:
        return self.prepared.saved_candidates(self.split).get(user)


def render_split(prepared, family: str, split: str, config: RenderConfig | None = None,
                 templates: TemplateSet | None = None, stats: dict | None = None):
    """Render one family's split of a prepared dataset into a ``datasets.Dataset`` (design.md §4 columns).

    train: each record gets ``config.renders[family]`` renders (default 1), templates drawn with
    ``template_weights``; yes/no negatives and candidate lists come from items the user never touched.
    valid/test: every selected template once per record (``all_templates_on_eval``), candidates and
    negatives from the saved ``direct`` candidates of the user (the positive is among them).
    Title templates are skipped (and counted) when the dataset has no item titles; rows whose needed data
    is missing (NaN rating, empty text) are dropped and counted. ``stats``, if given, receives the counts.
    """
    config = config or RenderConfig()
    templates = templates or load_templates(families=[family])
    info = templates.family_info(family)
    chosen = _select(templates, family, config)
    titles = item_titles(prepared)
    counts: Counter = Counter()
    if not titles:
        skipped = [t for t in chosen if t.needs_titles]
        if skipped:
            counts["templates_skipped_no_titles"] = len(skipped)
            logger.info("%s: skipping %d title templates (%s): dataset has no item titles",
                        family, len(skipped), ", ".join(t.id for t in skipped))
        chosen = [t for t in chosen if not t.needs_titles]
    table = prepared.family(info.data)[split]
    if config.max_records is not None:
        table = table.select(range(min(config.max_records, len(table))))
    if not chosen or len(table) == 0:
        if stats is not None:
            stats.update(counts)
        return _to_dataset({c: [] for c in ROW_COLUMNS})

    used = set().union(*(t.variables for t in chosen))
    names = _names_of(prepared) if "user_name" in used else {}
    rend = _Renderer(prepared.index, config, titles, names)
    rng = np.random.default_rng(config.seed)
    neg = _Negatives(prepared, rng)
    saved = _SavedCandidates(prepared, split)

    cols = _columns(table, table.column_names)
    n = len(table)
    keys = list(cols)
    records = [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]

    plan = _plan(chosen, records, split, family, config, rng)
    # The loop allocates millions of small lists/dicts and no cycles: the cyclic GC would only rescan them.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        out = _render_rows(chosen, records, plan, family, split, config, rng, rend, neg, saved, counts)
    finally:
        if was_enabled:
            gc.enable()
    if counts:
        logger.info("%s/%s: %s", family, split, dict(counts))
    if stats is not None:
        stats.update(counts)
    return _to_dataset(out)


def _render_rows(chosen, records, plan, family, split, config, rng, rend, neg, saved, counts) -> dict[str, list]:
    out = {c: [] for c in ROW_COLUMNS}
    source, target, tid, fam, user, item, answer, cands = (out[c] for c in ROW_COLUMNS)
    specs = [(t, sorted(t.variables), [f for f in t.fields if f in DATA_FIELDS], t.answers_item,
              bool(t.variables & CANDIDATE_FIELDS)) for t in chosen]
    for i, j in plan:
        t, names_t, needed, answers_item, shows_candidates = specs[j]
        rec = records[i]
        if needed and any(_missing(rec.get(f)) for f in needed):
            counts["dropped_missing_data"] += 1
            continue
        rec = _sample(t, rec, split, config, rng, neg, saved, counts)
        if rec is None:
            continue
        src, tgt = t.render(rend.context(rec, names_t))
        if not tgt:
            counts["dropped_empty_target"] += 1
            continue
        source.append(src)
        target.append(tgt)
        tid.append(t.id)
        fam.append(family)
        user.append(rec["user"])
        item.append(rec.get("item") or rec.get("target") or "")
        answer.append((rec.get("target") or "") if answers_item else tgt)
        cands.append(rec.get("candidates") or [] if shows_candidates else [])
    return out


def _to_dataset(out: dict[str, list]):
    """Build the row table straight in Arrow (Dataset.from_dict encodes row by row: ~3x slower)."""
    import datasets
    import pyarrow as pa

    arrays = {c: pa.array(out[c], type=pa.string()) for c in ROW_COLUMNS[:-1]}
    arrays["candidates"] = pa.array(out["candidates"], type=pa.list_(pa.string()))
    return datasets.Dataset(pa.table(arrays), info=datasets.DatasetInfo(features=_features()))


def _plan(chosen: list[Template], records: list[dict], split: str, family: str, config: RenderConfig,
          rng: np.random.Generator) -> Iterable[tuple[int, int]]:
    """(record index, template index) pairs in render order.

    Training: each record gets ``renders[family]`` templates drawn by weight among the per-record templates;
    ``sequence`` templates render on one record per user instead (the one with the longest history, whose
    history + target is the user's whole training sequence), ``sequence_renders`` times each.
    """
    n = len(records)
    if split != "train" and config.all_templates_on_eval:
        return [(i, j) for j in range(len(chosen)) for i in range(n)]
    plan: list[tuple[int, int]] = []
    for is_seq, rows, per in ((False, range(n), int(config.renders.get(family, 1))),
                              (True, None, int(config.sequence_renders))):
        js = [j for j, t in enumerate(chosen) if (t.scoring == SEQUENCE_SCORING) == is_seq]
        w = np.array([float(config.template_weights.get(chosen[j].id, 1.0)) for j in js])
        if not js or per <= 0 or w.sum() <= 0:
            continue
        if rows is None:  # a generator of its own: adding sequence rows leaves every other row's draws alone
            rows = _last_per_user(records)
        gen = np.random.default_rng([config.seed, 2]) if is_seq else rng
        picks = gen.choice(len(js), size=(len(rows), per), p=w / w.sum())
        plan += [(i, js[int(j)]) for i, p in zip(rows, picks) for j in p]
    return plan


def _last_per_user(records: list[dict]) -> list[int]:
    """Index of each user's record with the longest history (first such record), in user order of appearance."""
    best: dict[str, int] = {}
    for i, rec in enumerate(records):
        j = best.get(rec["user"])
        if j is None or len(rec.get("history") or ()) > len(records[j].get("history") or ()):
            best[rec["user"]] = i
    return list(best.values())


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return isinstance(v, str) and not v.strip()


def _sample(t: Template, rec: dict, split: str, config: RenderConfig, rng: np.random.Generator,
            neg: _Negatives, saved: _SavedCandidates, counts: Counter) -> dict | None:
    """Fill what the template asks about but the record lacks: star, yes/no item, candidate list."""
    v = t.variables
    if not (v & ({"star", "item"} | CANDIDATE_FIELDS)):
        return rec
    rec = dict(rec)
    user, target = rec["user"], rec.get("target") or ""
    pool = None
    if split != "train" and target:
        pool = saved.get(user)
        if pool is None:
            counts["no_saved_candidates"] += 1
            return None
        if target not in pool:
            counts["target_not_in_saved_candidates"] += 1
            pool = [target] + [c for c in pool if c != target][: len(pool) - 1]

    def negatives(k: int) -> list[str]:
        if pool is not None:
            others = [c for c in pool if c != target]
            if k >= len(others):
                return others
            if k == 1:
                return [others[int(rng.random() * len(others))]]
            return [others[j] for j in rng.choice(len(others), size=k, replace=False).tolist()]
        return neg.draw(user, k, exclude=[target])

    if "star" in v and rec.get("star") is None:
        rating = _fmt_rating(rec.get("rating"))
        if not rating:
            counts["dropped_missing_data"] += 1
            return None
        if rng.random() < config.yes_ratio:
            rec["star"] = rating
        else:
            stars = [str(s) for s in range(1, 6) if str(s) != rating]
            rec["star"] = stars[int(rng.random() * len(stars))]
    if "item" in v and not rec.get("item") and target:
        if rng.random() < config.yes_ratio:
            rec["item"] = target
        else:
            draw = negatives(1)
            rec["item"] = draw[0] if draw else target
    if v & CANDIDATE_FIELDS and not rec.get("candidates") and target:
        if pool is not None and t.scoring == "candidate_ranking":
            rec["candidates"] = list(pool)
        else:
            size = {"pairwise": 2, "listwise": config.n_list}.get(t.scoring, config.n_candidates)
            cands = negatives(size - 1)
            cands.insert(int(rng.random() * (len(cands) + 1)), target)
            rec["candidates"] = cands
    return rec


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers):
    """``p5rec templates list|preview|validate``; returns the group's subparsers (``studio`` joins them, cli.py)."""
    p = subparsers.add_parser("templates", help="list, preview and validate prompt templates; studio: write them in "
                              "a web page")
    sub = p.add_subparsers(dest="templates_command", metavar="SUBCOMMAND")
    sub.required = True

    q = sub.add_parser("list", help="table of templates with totals per family")
    q.add_argument("--family", action="append", help="only this family (repeatable)")
    q.add_argument("--unseen", action="store_true", help="only unseen (held-out) templates")
    q.add_argument("--file", action="append", default=[], help="also load this YAML file (repeatable)")
    q.set_defaults(func=_cmd_list)

    q = sub.add_parser("preview", help="render a template on real (or synthetic) records")
    q.add_argument("id", help="template id, e.g. 2-1")
    q.add_argument("--dataset", help="prepared dataset directory (default: synthetic records)")
    q.add_argument("-n", type=int, default=3, help="number of examples")
    q.add_argument("--split", default="test", choices=["train", "valid", "test"])
    q.add_argument("--id-form", default="token", choices=["token", "text"])
    q.add_argument("--seed", type=int, default=42)
    q.add_argument("--file", action="append", default=[], help="also load this YAML file (repeatable)")
    q.set_defaults(func=_cmd_preview)

    q = sub.add_parser("validate", help="check template files (default: the shipped ones)")
    q.add_argument("files", nargs="*", help="templates.yaml files")
    q.set_defaults(func=_cmd_validate)
    return sub


def _cmd_list(args) -> int:
    ts = load_templates(paths=args.file, families=args.family)
    rows = [t for t in ts if not args.unseen or not t.seen]
    print(f"{'id':<6} {'family':<12} {'seen':<7} {'scoring':<18} source")
    for t in rows:
        excerpt = " ".join(t.source.split())
        excerpt = excerpt if len(excerpt) <= 60 else excerpt[:57] + "..."
        print(f"{t.id:<6} {t.family:<12} {'seen' if t.seen else 'unseen':<7} {t.scoring:<18} {excerpt}")
    print()
    for fam in dict.fromkeys(t.family for t in rows):
        fs = [t for t in rows if t.family == fam]
        n_unseen = sum(not t.seen for t in fs)
        n_titles = sum(t.needs_titles for t in fs)
        print(f"{fam:<12} {len(fs):>3} templates ({len(fs) - n_unseen} seen, {n_unseen} unseen, {n_titles} need titles)")
    print(f"{'total':<12} {len(rows):>3}")
    return 0


class PreviewError(ValueError):
    """A template that cannot be previewed as asked; the message is the one line ``templates preview`` prints."""


def preview_rows(templates: TemplateSet, template_id: str, prepared=None, split: str = "test", n: int = 3,
                 config: RenderConfig | None = None, stats: dict | None = None) -> list[dict]:
    """Up to ``n`` rendered rows of one template: on the first records of a ``prepared`` split, the way training
    and evaluation render them (:func:`render_split`), or on synthetic records when ``prepared`` is None.

    Each row is ``{"source", "target", "user", "item", "candidates"}`` (raw ids; empty for synthetic records).
    ``config`` sets the rendering (id form, seed, history length; default :class:`RenderConfig`); the template is
    selected whether seen or not. Raises :class:`PreviewError` for an unknown id, a dataset without the table the
    family reads, or a template that fails to render (the sandbox's refusals included). ``stats`` receives
    :func:`render_split`'s counts (why rows were dropped) when nothing renders.
    """
    import dataclasses

    if template_id not in templates:
        raise PreviewError(f"no template {template_id!r}; `p5rec templates list` shows the {len(templates)} ids")
    t = templates.get(template_id)
    cfg = dataclasses.replace(config or RenderConfig(), template_ids=[t.id], max_records=max(n, 1))
    where = f"{t.file}:{t.line}: [{t.id}]"
    if prepared is None:
        try:
            pairs = render_records(t, _synthetic_records()[:n], _SyntheticIndex(), cfg, titles=_SYNTHETIC_TITLES)
        except (SecurityError, jinja2.TemplateError) as exc:
            raise PreviewError(f"{where} {type(exc).__name__}: {exc}") from None
        return [{"source": src, "target": tgt, "user": "", "item": "", "candidates": []} for src, tgt in pairs]
    from p5rec.data.prepare import FAMILY_DIRS, PreparedError

    data = templates.family_info(t.family).data
    if not prepared.has_family(data):
        why = prepared.manifest.get("skipped", {}).get(data) or (
            f"not a prepared table ({', '.join(FAMILY_DIRS)})" if data not in FAMILY_DIRS else "not prepared")
        have = ", ".join(prepared.manifest.get("families", {})) or "none"
        raise PreviewError(f"{prepared.path} has no {data!r} table for template {t.id} ({t.family} family): "
                           f"{why}; it has {have}")
    try:
        ds = render_split(prepared, t.family, split, cfg, templates, stats=stats)
    except (SecurityError, jinja2.TemplateError, PreparedError) as exc:
        raise PreviewError(f"{where} {type(exc).__name__}: {exc}") from None
    ds = ds.select(range(min(n, len(ds))))
    cols = _columns(ds, ["source", "target", "user", "item", "candidates"])
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def _preview_error(message: str) -> int:
    print(f"p5rec templates preview: {message}", file=sys.stderr)
    return 2


def _cmd_preview(args) -> int:
    try:
        ts = load_templates(paths=args.file)
    except TemplateError as exc:
        more = f" (and {len(exc.problems) - 1} more problem(s); see `p5rec templates validate`)" \
            if len(exc.problems) > 1 else ""
        return _preview_error(f"{exc.problems[0]}{more}")
    prepared = None
    if args.dataset:
        from p5rec.data.prepare import PreparedError, load_prepared

        try:
            prepared = load_prepared(args.dataset)
        except (FileNotFoundError, PreparedError) as exc:
            return _preview_error(str(exc))
    stats: dict = {}
    try:
        rows = preview_rows(ts, args.id, prepared, args.split, args.n,
                            RenderConfig(seed=args.seed, id_form=args.id_form), stats)
    except PreviewError as exc:
        return _preview_error(str(exc))
    if not rows:
        print(f"{args.id}: nothing rendered on {args.dataset} ({args.split}): {stats or 'no records'}",
              file=sys.stderr)
        return 1
    t = ts.get(args.id)
    print(f"{t.id} {t.name} ({t.family}, {'seen' if t.seen else 'unseen'}, {t.scoring})")
    for row in rows:
        print(f"\n  source: {row['source']}\n  target: {row['target']}")
    return 0


def _cmd_validate(args) -> int:
    files = [Path(f) for f in args.files] or shipped_files()
    problems: list[Problem] = []
    n = 0
    for f in files:
        probs = validate(f)
        problems += probs
        if not probs:
            n += len(load_templates(paths=[f], include_shipped=False))
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s)")
        return 1
    print(f"OK: {n} templates")
    return 0
