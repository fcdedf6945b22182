"""Task families as data: the header of ``tasks/<family>/templates.yaml`` declares what p5rec knows about a family.

A family is its folder and nothing in Python (docs/design.md §4). The header, above ``schema`` and ``templates``:

    family: rating
    data: rating        # the prepared table it reads: prepared.family(data) (p5rec.data.prepare.FAMILY_DIRS)
    task: rating-prediction  # what it does, as a model card's task type (default: the family's name)
    order: 3            # its place in listings, in the default --families and in the evaluation
    train: true         # the main job trains it (it is in the default --families)
    renders: 3          # prompts rendered per training record (the --renders default)
    protocols:          # how its templates are reported, per evaluation protocol (p5rec.eval.evaluation.PROTOCOLS)
      rating:
        metrics: [RMSE, MAE, RMSE_expected, MAE_expected, invalid]  # columns of the family's results table
        headline: RMSE                                              # its metric in the headline table
        baselines: [biased MF]                                      # beside the headline: the first one run
      choice accuracy: {metrics: [accuracy], headline: accuracy}
    baselines:          # how a baseline named above is computed, where its name is not a method's own name
      biased MF: {method: biased MF, field: rating}     # methods: p5rec.eval.evaluation.BASELINES
    curve: {protocols: [rating], metric: RMSE}   # learning curve: one template per protocol, this metric
    inference: {rating: "1-1"}                   # P5Rec's default template per role: an id, or [known, new user]
    decoding: {contrast: 3, without: [review], plausibility: 0.1}  # text: context-aware decoding (below)

``decoding`` sets how the family's generated text is decoded, in evaluation and in ``P5Rec`` alike: each next
token scored ``(1 + contrast) log p(own prompt) - contrast log p(the prompt without the fields in without)``
(:class:`p5rec.eval.decoding.PromptContrast`), so words the template alone makes likely gain nothing; a template
using none of those fields is decoded plainly. Default: no contrast. Or the text is chosen, not written:

    decoding: {choose: item, hints: [feature], candidates: 8, length_penalty: 1.25}

answers each case with one of the training texts of its ``choose`` field's value (the case's item: at most
``candidates`` of them, in a fixed order that does not depend on the text's content or frequency), where a
template showing a ``hints`` field keeps those that mention the hint (none do: the hint's most common training
texts), the one with the highest ``log P(text | prompt) / tokens ** length_penalty`` under the model
(:func:`p5rec.eval.decoding.choose_texts`; ``p5rec.eval.evaluation.TextPool``).

Only ``family`` is required; a file that adds templates to a family another file declares repeats ``family``,
``data`` and (a subset of) ``schema`` and nothing else. Every other key has a default that leaves the family out
of the main job and out of the headline table. :func:`parse_spec` checks the header and reports each problem as
one line naming the file, the field and what was expected; :mod:`p5rec.prompts.templates` turns them into its
:class:`~p5rec.prompts.templates.Problem` list, so ``p5rec templates validate`` shows them with the rest.

This module reads YAML only (no Jinja, no numpy), so the CLI and training defaults can read the shipped specs
cheaply at import.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["FamilySpec", "ProtocolSpec", "BaselineSpec", "CurveSpec", "DecodingSpec", "ROLES", "SPEC_KEYS",
           "parse_spec", "shipped_specs", "main_families", "tasks_root"]

# The roles P5Rec fills with a family's default templates (p5rec.serve.inference): one family declares each.
ROLES = ("recommend", "rank", "rank_direct", "rating", "explain", "explain_feature", "summarize", "rate_review")
# header keys that declare the family (besides family, data, schema, templates)
SPEC_KEYS = ("task", "order", "train", "renders", "protocols", "baselines", "curve", "inference", "decoding")
_LAST = 1_000_000  # order of a family that declares none: after every one that does


@dataclass(frozen=True)
class ProtocolSpec:
    metrics: tuple[str, ...] = ()  # result keys shown for the family, in this order
    headline: str | None = None  # the one metric of the headline table (None: no headline row)
    baselines: tuple[str, ...] = ()  # baseline names beside the headline; the first one that was run is shown


@dataclass(frozen=True)
class BaselineSpec:
    """How a named baseline is computed: a method of ``p5rec.eval.evaluation.BASELINES`` and its string arguments
    (``field``: the column it predicts, ``input``: the column it reads)."""

    method: str
    args: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CurveSpec:
    protocols: tuple[str, ...]  # one template per protocol; the first is keyed by the family's name alone
    metric: str  # the metric put into the Trainer's eval metrics (eval_<family>_<metric>)


@dataclass(frozen=True)
class DecodingSpec:
    """How a family's text is decoded: context-aware (the contrast weight, the fields left empty in the contrast
    prompt, and the plausibility floor: tokens under that factor of the best one are dropped; 0: none), or chosen
    among training texts (``choose`` and the fields after it)."""

    contrast: float = 0.0
    without: tuple[str, ...] = ()
    plausibility: float = 0.0
    # chosen, not written: the training texts of the case's value of this field (""; free decoding)
    choose: str = ""
    hints: tuple[str, ...] = ()  # fields whose value, shown in a prompt, narrows the texts to those mentioning it
    candidates: int = 8  # texts per case at most
    length_penalty: float = 1.0  # a text scores log P / tokens ** length_penalty


@dataclass
class FamilySpec:
    """One family, as its templates.yaml header declares it."""

    family: str
    data: str  # the prepared table the family reads: prepared.family(data) (design.md §2)
    schema: dict[str, str]
    file: str
    line: int = 1  # of the ``data:`` key (``family:`` when there is none)
    task: str = ""  # what the family does, as a model card's task type (e.g. rating-prediction); default: its name
    order: int = _LAST
    train: bool = False
    renders: int = 1
    protocols: dict[str, ProtocolSpec] = field(default_factory=dict)
    baselines: dict[str, BaselineSpec] = field(default_factory=dict)  # name -> method; undeclared: method = name
    curve: CurveSpec | None = None
    inference: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (known user, new user)
    decoding: DecodingSpec = DecodingSpec()
    declared: frozenset[str] = frozenset()  # the SPEC_KEYS this file states

    @property
    def metrics(self) -> list[str]:
        """Result keys of the family's table: every protocol's metrics, in declaration order, once each."""
        return list(dict.fromkeys(m for p in self.protocols.values() for m in p.metrics))

    def baseline(self, name: str) -> BaselineSpec:
        """How the baseline ``name`` (a protocol's ``baselines:`` entry) is computed."""
        return self.baselines.get(name) or BaselineSpec(name)

    def template_ids(self) -> set[str]:
        return {tid for pair in self.inference.values() for tid in pair}


def parse_spec(data: Mapping[str, Any], file: str, line: int = 1) -> tuple[FamilySpec | None, list[str]]:
    """The :class:`FamilySpec` of one parsed templates.yaml (a mapping), and its problems as one-line messages
    ``"<field>: <what was expected>"`` (the caller adds the file). Spec is None when ``family`` is missing."""
    problems: list[str] = []
    fam = data.get("family")
    if not isinstance(fam, str) or not fam.strip():
        return None, ["family: expected the family's name (a non-empty string)"]
    table = data.get("data", fam)
    if not isinstance(table, str) or not table:
        problems.append(f"data: expected the name of a prepared table, got {table!r}")
        table = fam
    schema = data.get("schema") if isinstance(data.get("schema"), dict) else {}
    spec = FamilySpec(fam, table, {str(k): str(v) for k, v in schema.items()}, file, line,
                      declared=frozenset(k for k in SPEC_KEYS if k in data))

    def bad(where: str, expected: str, got: Any) -> None:
        problems.append(f"{where}: expected {expected}, got {got!r}")

    if "task" in data:
        if isinstance(data["task"], str) and data["task"]:
            spec.task = data["task"]
        else:
            bad("task", "a task type such as rating-prediction", data["task"])
    spec.task = spec.task or fam
    if "order" in data:
        if _is_int(data["order"]):
            spec.order = data["order"]
        else:
            bad("order", "an integer", data["order"])
    if "train" in data:
        if isinstance(data["train"], bool):
            spec.train = data["train"]
        else:
            bad("train", "true or false", data["train"])
    if "renders" in data:
        if _is_int(data["renders"]) and data["renders"] >= 0:
            spec.renders = data["renders"]
        else:
            bad("renders", "a whole number >= 0", data["renders"])
    protocols = data.get("protocols", {})
    if not isinstance(protocols, dict):
        bad("protocols", "a mapping of protocol name -> {metrics, headline, baselines}", protocols)
        protocols = {}
    for name, p in protocols.items():
        where = f"protocols.{name}"
        if p is None:
            p = {}
        if not isinstance(p, dict):
            bad(where, "a mapping with metrics, headline, baselines", p)
            continue
        unknown = sorted(set(p) - {"metrics", "headline", "baselines"})
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; expected metrics, headline, baselines")
        metrics = _names(p.get("metrics", []), f"{where}.metrics", "a list of metric names", problems)
        baselines = _names(p.get("baselines", []), f"{where}.baselines", "a list of baseline names", problems)
        headline = p.get("headline")
        if headline is not None and (not isinstance(headline, str) or not headline):
            bad(f"{where}.headline", "a metric name", headline)
            headline = None
        elif headline is not None and metrics and headline not in metrics:
            problems.append(f"{where}.headline: expected one of its metrics ({', '.join(metrics)}), got {headline!r}")
        spec.protocols[str(name)] = ProtocolSpec(tuple(metrics), headline, tuple(baselines))
    declared_baselines = data.get("baselines", {})
    if not isinstance(declared_baselines, dict):
        bad("baselines", "a mapping of baseline name -> {method, field, input}", declared_baselines)
        declared_baselines = {}
    for name, b in declared_baselines.items():
        where = f"baselines.{name}"
        if not isinstance(b, dict) or not isinstance(b.get("method"), str) or not b["method"]:
            bad(where, "a mapping with a method name (and string arguments such as field, input)", b)
            continue
        args = {k: v for k, v in b.items() if k != "method"}
        if not all(isinstance(v, str) and v for v in args.values()):
            bad(where, "string arguments", args)
            continue
        spec.baselines[str(name)] = BaselineSpec(b["method"], tuple(sorted(args.items())))
    if "curve" in data:
        c = data["curve"]
        if not isinstance(c, dict):
            bad("curve", "a mapping with protocols (a list) and metric", c)
        else:
            protos = _names(c.get("protocols"), "curve.protocols", "a non-empty list of protocol names", problems)
            metric = c.get("metric")
            if not isinstance(metric, str) or not metric:
                bad("curve.metric", "a metric name", metric)
            elif protos:
                spec.curve = CurveSpec(tuple(protos), metric)
    inference = data.get("inference", {})
    if not isinstance(inference, dict):
        bad("inference", f"a mapping of role ({', '.join(ROLES)}) -> template id or [known user, new user]",
            inference)
        inference = {}
    for role, ids in inference.items():
        where = f"inference.{role}"
        if role not in ROLES:
            problems.append(f"{where}: expected a role P5Rec uses ({', '.join(ROLES)}), got {role!r}")
            continue
        if isinstance(ids, str) and ids:
            spec.inference[role] = (ids, ids)
        elif isinstance(ids, list) and len(ids) == 2 and all(isinstance(i, str) and i for i in ids):
            spec.inference[role] = (ids[0], ids[1])
        else:
            bad(where, "a template id, or a list [id for a known user, id for a new user]", ids)
    if "decoding" in data:
        spec.decoding = _decoding(data["decoding"], spec.schema, bad, problems)
    return spec, problems


DECODING_KEYS = ("contrast", "without", "plausibility", "choose", "hints", "candidates", "length_penalty")


def _decoding(d: Any, schema: Mapping[str, str], bad, problems: list[str]) -> DecodingSpec:
    if not isinstance(d, dict):
        bad("decoding", f"a mapping with {', '.join(DECODING_KEYS)}", d)
        return DecodingSpec()
    unknown = sorted(set(d) - set(DECODING_KEYS))
    if unknown:
        problems.append(f"decoding: unknown key(s) {', '.join(map(str, unknown))}; expected "
                        f"{', '.join(DECODING_KEYS)}")
    contrast, plausibility = d.get("contrast", 0.0), d.get("plausibility", 0.0)
    if not _is_number(contrast) or contrast < 0:
        bad("decoding.contrast", "a number >= 0", contrast)
        contrast = 0.0
    if not _is_number(plausibility) or not 0 <= plausibility < 1:
        bad("decoding.plausibility", "a number in [0, 1)", plausibility)
        plausibility = 0.0
    without = _names(d.get("without", []), "decoding.without", "a list of the schema's field names", problems)
    hints = _names(d.get("hints", []), "decoding.hints", "a list of the schema's field names", problems)
    choose = d.get("choose", "")
    if not isinstance(choose, str):
        bad("decoding.choose", "a field name of the schema", choose)
        choose = ""
    for key, names in (("without", without), ("hints", hints), ("choose", [choose] if choose else [])):
        missing = [f for f in names if schema and f not in schema]
        if missing:
            problems.append(f"decoding.{key}: {', '.join(missing)} not in the family's schema "
                            f"({', '.join(schema)})")
    if contrast and not without:
        problems.append("decoding.without: expected the fields the contrast prompt leaves empty (contrast > 0)")
    candidates, penalty = d.get("candidates", 8), d.get("length_penalty", 1.0)
    if not _is_int(candidates) or candidates < 1:
        bad("decoding.candidates", "an integer >= 1", candidates)
        candidates = 8
    if not _is_number(penalty) or penalty < 0:
        bad("decoding.length_penalty", "a number >= 0", penalty)
        penalty = 1.0
    if choose and contrast:
        problems.append("decoding: choose and contrast exclude each other (a chosen text is not decoded token "
                        "by token)")
    if not choose and (hints or "candidates" in d or "length_penalty" in d):
        problems.append("decoding: hints, candidates and length_penalty need choose (the field whose training "
                        "texts are chosen among)")
    return DecodingSpec(float(contrast), tuple(without), float(plausibility), choose, tuple(hints),
                        int(candidates), float(penalty))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(value: Any, where: str, expected: str, problems: list[str]) -> list[str]:
    if value is None or not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}: expected {expected}, got {value!r}")
        return []
    if "non-empty" in expected and not value:
        problems.append(f"{where}: expected {expected}, got []")
    return list(value)


# ------------------------------------------------------------------------------------------------ shipped
def tasks_root() -> Path:
    """The folder holding the shipped ``<family>/templates.yaml``.

    An installed copy has it inside the package (``p5rec/tasks``); a source checkout has it beside the package
    (``tasks/``, which pyproject maps to ``p5rec.tasks``). The checkout's own folder is looked for before asking
    the import system, which under ``PYTHONPATH=<another checkout>`` still answers with the editable install's.
    """
    package = Path(__file__).resolve().parents[1]  # p5rec/ (this file is p5rec/prompts/families.py)
    for root in (package / "tasks", package.parent / "tasks"):
        if (root / "__init__.py").is_file() and any(root.glob("*/templates.yaml")):
            return root
    return Path(str(importlib.resources.files("p5rec.tasks")))


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[FamilySpec, ...]:
    specs = []
    for f in sorted(tasks_root().glob("*/templates.yaml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        spec, problems = parse_spec(data, str(f))
        if problems or spec is None:  # shipped files are checked by the tests; say which field, never guess
            raise ValueError(f"{f}: {(problems or ['family: missing'])[0]}")
        specs.append(spec)
    return tuple(sorted(specs, key=lambda s: (s.order, s.family)))


def shipped_specs() -> dict[str, FamilySpec]:
    """family -> spec of every shipped family, in ``order`` (read once per process)."""
    return {s.family: s for s in _shipped()}


def main_families() -> tuple[str, ...]:
    """The families the main job trains (``train: true``), in ``order``: the default ``--families``."""
    return tuple(s.family for s in _shipped() if s.train)


def main_renders() -> str:
    """The default ``--renders``: ``family=N`` for each main-job family, in ``order``."""
    return ",".join(f"{s.family}={s.renders}" for s in _shipped() if s.train)
