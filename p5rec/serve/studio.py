"""The template studio: a web page to browse, render, write, check and save prompt templates.

    p5rec templates studio --dataset prepared/mi          # standalone, no trained run: http://127.0.0.1:8001/studio
    p5rec serve --run runs/<run>                          # the same page at /studio, on the run's data and templates

Browse: every family and template (id, seen/unseen, scoring, fields, the Jinja) and render any template on the
first records of a prepared split, exactly as training and evaluation render them (:func:`~p5rec.prompts.templates.
preview_rows`); id surfaces in the output are mapped back to raw ids (and item titles where the dataset has them).

Write: a YAML file in the page, checked as it is typed by the CLI's own functions (:func:`~p5rec.prompts.templates.validate`,
then :func:`~p5rec.prompts.templates.load_templates` beside the shipped files, as ``train.py --template_files`` loads it), so
the messages are ``p5rec templates validate``'s (``file:line: [id] kind: message``); previewed on real records; saved
into the directory given on the command line, never over an existing file unless the request says ``overwrite``.

Every render goes through the templates' own sandboxed Jinja environment (``ImmutableSandboxedEnvironment``, as the
CLI): the page sends YAML text and gets strings back, nothing it sends runs outside the sandbox, and the page shows
outputs as text, never as HTML.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the routes defined inside
# functions (Request, the body models), which string annotations would hide from it.
import importlib.resources
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p5rec import atomic
from p5rec.prompts.templates import (FIELDS, PreviewError, RenderConfig, TemplateError, TemplateSet, item_titles,
                             load_templates, preview_rows, validate)

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MAX_ROWS = 50  # rows one render request may ask for
MAX_DRAFT_BYTES = 256 * 1024
# a file name the studio may save to: a plain name in the save directory, ending in .yaml or .yml
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.ya?ml")


class StudioError(ValueError):
    """A request the studio refuses; ``status`` is its HTTP status and ``field`` the request field at fault."""

    def __init__(self, message: str, status: int = 422, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


# ---------------------------------------------------------------------------------------------- ids back to raw
class IdMapper:
    """Splits rendered text into plain text and id surfaces, each surface with the raw id it stands for.

    Surfaces are found by their shape (``<u17>``, ``<i5>``, a run of level tokens ``<a3><b0><c12>``; ``user_17``,
    ``item_3_0_12`` in text form) and looked up, longest first, in the index's reverse maps: no regular expression
    over every id, which would be slow on a catalogue of tens of thousands of items.
    """

    def __init__(self, index, form: str, titles: dict[str, str] | None = None):
        self.form, self.titles = form, titles or {}
        self.surfaces: dict[str, tuple[str, str]] = {}
        for raw in index.users:
            self.surfaces[index.user_text(raw, form)] = ("user", raw)
        for raw in index.items:
            self.surfaces[index.item_text(raw, form)] = ("item", raw)
        self.pattern = re.compile(r"(?:<[a-z]\d+>)+" if form == "token" else r"(?:user|item)(?:_\d+)+(?!\w)")

    def _pieces(self, run: str) -> list[str]:
        if self.form == "token":
            return re.findall(r"<[a-z]\d+>", run)
        head, *rest = run.split("_")
        return [head] + ["_" + r for r in rest]

    def segments(self, text: str) -> list[dict]:
        """``[{"text": ...}, {"text": surface, "kind": "item", "raw": ..., "title": ...}, ...]`` covering ``text``."""
        out: list[dict] = []
        pos = 0

        def plain(s: str) -> None:
            if s:
                if out and "kind" not in out[-1]:
                    out[-1]["text"] += s
                else:
                    out.append({"text": s})

        for m in self.pattern.finditer(text):
            plain(text[pos : m.start()])
            pieces = self._pieces(m.group(0))
            i = 0
            while i < len(pieces):
                for j in range(len(pieces), i, -1):  # the longest run of pieces that is a surface
                    surface = "".join(pieces[i:j])
                    hit = self.surfaces.get(surface)
                    if hit is not None:
                        kind, raw = hit
                        out.append({"text": surface, "kind": kind, "raw": raw,
                                    "title": self.titles.get(raw) if kind == "item" else None})
                        i = j
                        break
                else:
                    plain(pieces[i])
                    i += 1
            pos = m.end()
        plain(text[pos:])
        return out


# ---------------------------------------------------------------------------------------------- the studio
@dataclass
class Studio:
    """What the page works on: templates, a prepared dataset (or synthetic records), where drafts are saved."""

    templates: TemplateSet
    prepared: Any  # p5rec.data.prepare.PreparedDataset, or None for synthetic records
    dataset_label: str
    config: RenderConfig
    save_dir: Path
    template_files: list[Path] = field(default_factory=list)  # loaded beside the shipped files (a run's own)
    run_label: str | None = None
    _mapper: IdMapper | None = field(default=None, repr=False)

    @classmethod
    def for_dataset(cls, dataset: str | Path | None, save_dir: str | Path = ".", files: list[Path] | None = None,
                    id_form: str = "token") -> "Studio":
        """A studio over a prepared dataset (None: synthetic records); :class:`StudioError` if it cannot open."""
        from p5rec.data.prepare import PreparedError, load_prepared

        files = [Path(f) for f in files or []]
        templates = _load(files)
        prepared = None
        if dataset is not None:
            try:
                prepared = load_prepared(dataset)
            except (FileNotFoundError, PreparedError) as exc:
                raise StudioError(str(exc)) from None
        label = _label(prepared) if prepared is not None else "synthetic records (no --dataset given)"
        return cls(templates, prepared, label, RenderConfig(id_form=id_form), _save_dir(save_dir), files)

    @classmethod
    def for_run(cls, run, dataset: str | Path | None = None, save_dir: str | Path = ".") -> "Studio":
        """A studio over a run's templates and render settings, on the data it trained on (or ``dataset``).

        A run whose prepared data moved or changed still serves: the studio falls back to synthetic records and
        says why."""
        from p5rec.run import RunError

        extra = run.config.get("data", {}).get("template_files")
        files = [Path(p) for p in extra.split(",")] if extra else []
        if dataset is not None:
            studio = cls.for_dataset(dataset, save_dir, files, run.render_config.id_form)
        else:
            try:
                prepared = run.prepared()
                label = _label(prepared)
            except RunError as exc:
                logger.warning("studio: synthetic records only: %s", exc)
                prepared, label = None, f"synthetic records (the run's prepared data: {exc})"
            studio = cls(run.templates, prepared, label, run.render_config, _save_dir(save_dir), files)
        studio.config = run.render_config
        studio.run_label = str(run.path)
        return studio

    # ------------------------------------------------------------------ what the page asks
    @property
    def mapper(self) -> IdMapper | None:
        if self._mapper is None and self.prepared is not None:
            self._mapper = IdMapper(self.prepared.index, self.config.id_form, item_titles(self.prepared))
        return self._mapper

    def catalog(self) -> dict:
        """Families with their schema and templates, and what the dataset offers."""
        families = []
        for fam in self.templates.families:
            info = self.templates.family_info(fam)
            families.append({
                "family": fam, "data": info.data, "schema": info.schema, "file": info.file,
                "available": self.prepared is None or self.prepared.has_family(info.data),
                "templates": [_template_dict(t) for t in self.templates.by_family(fam)],
            })
        dataset = {"label": self.dataset_label, "synthetic": self.prepared is None,
                   "path": str(self.prepared.path) if self.prepared is not None else None}
        if self.prepared is not None:
            dataset.update(users=len(self.prepared.index.users), items=len(self.prepared.index.items),
                           tables=sorted(self.prepared.manifest.get("families", {})),
                           titles=bool(self.mapper and self.mapper.titles))
        return {"families": families, "dataset": dataset, "run": self.run_label, "splits": list(SPLITS),
                "save_dir": str(self.save_dir.resolve()), "id_form": self.config.id_form,
                "fields": {name: description for name, (description, _) in FIELDS.items()}}

    def render(self, template_id: str, split: str = "test", n: int = 5, templates: TemplateSet | None = None) -> dict:
        """Up to ``n`` rows of a template on the first records of ``split``, ids mapped back to raw ids."""
        if split not in SPLITS:
            raise StudioError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", field="split")
        if not 1 <= n <= MAX_ROWS:
            raise StudioError(f"n must be between 1 and {MAX_ROWS}, got {n}", field="n")
        templates = templates or self.templates
        stats: dict = {}
        try:
            rows = preview_rows(templates, template_id, self.prepared, split, n, self.config, stats)
        except PreviewError as exc:
            raise StudioError(str(exc), field="template") from None
        mapper = self.mapper

        def seg(text: str) -> list[dict]:
            return mapper.segments(text) if mapper is not None else [{"text": text}]

        return {
            "template": _template_dict(templates.get(template_id)), "split": split,
            "rows": [{"source": seg(r["source"]), "target": seg(r["target"]), "source_text": r["source"],
                      "target_text": r["target"], "user": r["user"], "item": r["item"],
                      "candidates": len(r["candidates"] or [])} for r in rows],
            "dropped": {k: v for k, v in stats.items()} if not rows else {},
        }

    def draft_path(self, filename: str) -> Path:
        if not isinstance(filename, str) or not FILENAME.fullmatch(filename):
            raise StudioError(f"file name {filename!r}: a plain name ending in .yaml or .yml (letters, digits, '.', "
                              "'_', '-'); it is saved into the studio's save directory", field="filename")
        return self.save_dir / filename

    def check(self, filename: str, text: str) -> tuple[dict, TemplateSet | None]:
        """The CLI's checks of a draft: ``validate`` (as ``p5rec templates validate FILE``), then, if it passes,
        ``load_templates`` beside the shipped (and run's) files, as ``train.py --template_files FILE`` loads it."""
        if len(text.encode("utf-8")) > MAX_DRAFT_BYTES:
            raise StudioError(f"the draft is over {MAX_DRAFT_BYTES // 1024} KiB", field="text")
        path = self.draft_path(filename)
        problems = validate(path, text=text)
        templates = None
        if not problems:
            try:
                templates = load_templates(paths=self.template_files, texts={str(path): text})
            except TemplateError as exc:
                problems = exc.problems
        drafted = [_template_dict(t) for t in templates if Path(t.file) == path] if templates is not None else []
        report = {"ok": not problems, "file": str(path), "exists": path.exists(), "templates": drafted,
                  "problems": [{"text": str(p), "line": p.line, "template": p.template, "kind": p.kind,
                                "message": p.message} for p in problems]}
        return report, templates

    def preview(self, filename: str, text: str, template_id: str | None, split: str = "test", n: int = 5) -> dict:
        report, templates = self.check(filename, text)
        if templates is None:
            return {"check": report, "render": None}
        ids = [t["id"] for t in report["templates"]]
        if not ids:
            raise StudioError("the draft has no templates to preview", field="text")
        template_id = template_id if template_id in ids else ids[0]
        try:
            return {"check": report, "render": self.render(template_id, split, n, templates)}
        except StudioError as exc:  # valid, but not renderable here (say the dataset lacks the family's table)
            return {"check": report, "render": None, "render_error": str(exc)}

    def save(self, filename: str, text: str, overwrite: bool = False) -> dict:
        """Write a draft that passes :meth:`check` into the save directory. An existing file is replaced only
        with ``overwrite`` (and atomically); without it the file is created exclusively, so a file that appears
        meanwhile is not replaced either."""
        report, _ = self.check(filename, text)
        path = Path(report["file"])
        if not report["ok"]:
            raise StudioError(f"not saved: {len(report['problems'])} problem(s), the first: "
                              f"{report['problems'][0]['text']}", field="text")
        if path.is_dir():
            raise StudioError(f"{path} is a directory", field="filename")
        if overwrite:
            atomic.write_text(path, text)
        else:
            try:
                _create_exclusive(path, text)
            except FileExistsError:
                raise StudioError(f"{path} exists; tick 'overwrite' to replace it", status=409,
                                  field="overwrite") from None
        return {"saved": str(path), "templates": [t["id"] for t in report["templates"]],
                "train": f"python train.py --template_files {path}"}

    # ------------------------------------------------------------------ HTTP
    def router(self):
        """The page at ``""``/``"/"`` and its JSON API under ``/api``; include with a prefix (``/studio``)."""
        from fastapi import APIRouter
        from fastapi.responses import HTMLResponse, JSONResponse
        from pydantic import BaseModel, Field

        class Render(BaseModel):
            template: str
            split: str = "test"
            n: int = 5

        class Draft(BaseModel):
            filename: str = "my_templates.yaml"
            text: str = Field(description="the YAML file's content")
            template: str | None = Field(None, description="which of the draft's templates to preview")
            split: str = "test"
            n: int = 5
            overwrite: bool = Field(False, description="replace an existing file (save only)")

        router = APIRouter(tags=["studio"])
        page = page_html()

        def call(fn, *args):
            try:
                return fn(*args)
            except StudioError as exc:
                return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)

        @router.get("", include_in_schema=False)
        @router.get("/", include_in_schema=False)
        def studio_page():
            return HTMLResponse(page, headers={"Cache-Control": "no-store"})

        @router.get("/api/catalog", summary="Families, templates and the dataset.")
        def catalog():
            return self.catalog()

        @router.get("/api/starter", summary="A YAML file holding a copy of a template, to start a new one from.")
        def starter(template: str | None = None, family: str | None = None):
            return call(self.starter, template, family)

        @router.post("/api/render", summary="Render a template on the first records of a split.")
        def render(body: Render):
            return call(self.render, body.template, body.split, body.n)

        @router.post("/api/check", summary="Validate a draft file, with the CLI's checks and messages.")
        def check(body: Draft):
            return call(lambda: self.check(body.filename, body.text)[0])

        @router.post("/api/preview", summary="Validate a draft and render one of its templates.")
        def preview(body: Draft):
            return call(self.preview, body.filename, body.text, body.template, body.split, body.n)

        @router.post("/api/save", summary="Save a valid draft into the save directory (never over a file "
                                          "unless overwrite is true).")
        def save(body: Draft):
            return call(self.save, body.filename, body.text, body.overwrite)

        return router

    def starter(self, template: str | None = None, family: str | None = None) -> dict:
        """A draft file: the family's header and a copy of ``template`` (or the family's first) under a new id."""
        if template is not None:
            if template not in self.templates:
                raise StudioError(f"no template {template!r}", field="template")
            t = self.templates.get(template)
        else:
            fam = self.templates.by_family(family or "")
            if not fam:
                raise StudioError(f"no template family {family!r}; known: {', '.join(self.templates.families)}",
                                  field="family")
            t = fam[0]
        info = self.templates.family_info(t.family)
        q = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731 - a JSON string is a YAML double-quoted scalar
        lines = [f"family: {t.family}", f"data: {info.data}", "schema:"]
        lines += [f"  {k}: {q(v)}" for k, v in info.schema.items()]
        lines += ["templates:", f"  - id: {q('my-' + t.id)}", f"    name: {q('my_' + t.name)}", "    seen: true",
                  f"    scoring: {t.scoring}"]
        if t.answer_choices:
            lines.append(f"    answer_choices: [{', '.join(q(c) for c in t.answer_choices)}]")
        lines += [f"    fields: [{', '.join(t.fields)}]", f"    source: {q(t.source.strip())}",
                  f"    target: {q(t.target.strip())}"]
        return {"text": "\n".join(lines) + "\n", "template": "my-" + t.id, "family": t.family}


def _label(prepared) -> str:
    return str(prepared.manifest.get("dataset") or Path(prepared.path).name)


def _template_dict(t) -> dict:
    return {"id": t.id, "name": t.name, "family": t.family, "seen": t.seen, "scoring": t.scoring,
            "fields": list(t.fields), "answer_choices": t.answer_choices, "source": t.source, "target": t.target,
            "file": t.file, "line": t.line, "needs_titles": t.needs_titles}


def _load(files: list[Path]) -> TemplateSet:
    try:
        return load_templates(paths=files)
    except TemplateError as exc:
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        raise StudioError(f"{exc.problems[0]}{more}") from None


def _save_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise StudioError(f"--save-dir {path}: no such directory")
    return path


def _create_exclusive(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, failing with FileExistsError if it exists (even if it appears while
    writing): the text goes to a hidden sibling, which is then hard-linked to ``path`` (link never replaces)."""
    if path.exists():
        raise FileExistsError(path)
    temporary = atomic.temporary_sibling(path)
    try:
        atomic.write_text(temporary, text)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def page_html() -> str:
    return (importlib.resources.files("p5rec.serve") / "static" / "studio.html").read_text(encoding="utf-8")


def validation_error_handler(request, exc):
    """FastAPI's body errors in the studio's shape: ``{"error": ..., "field": ...}`` naming the first field."""
    from fastapi.responses import JSONResponse

    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    name = ".".join(loc) or None
    message = f"field {name!r}: {first.get('msg', 'invalid')}" if name else first.get("msg", "invalid request body")
    return JSONResponse({"error": message, "field": name}, status_code=422)


def create_app(studio: Studio):
    """The standalone studio: the page at ``/studio`` (``/`` redirects there)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import RedirectResponse

    app = FastAPI(title="p5rec template studio", description="Browse, render, write and save prompt templates.")
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(studio.router(), prefix="/studio")

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/studio/")

    return app


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    """``p5rec templates studio`` (added to the ``templates`` sub-commands)."""
    from p5rec.argtypes import port

    q = sub.add_parser("studio", help="web page to browse, render, write and save templates (no trained run needed)")
    q.add_argument("--dataset", help="prepared dataset directory whose records templates render on "
                   "(default: synthetic records)")
    q.add_argument("--save-dir", type=Path, default=Path("."),
                   help="directory the page saves template files into (default: the current directory)")
    q.add_argument("--file", action="append", default=[], help="also load this YAML file (repeatable)")
    q.add_argument("--id-form", default="token", choices=["token", "text"])
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=port, default=8001, help="port (0: any free port; default 8001)")
    q.set_defaults(func=_cmd_studio)


def _cmd_studio(args) -> int:
    from p5rec.serve.httpserver import is_loopback, listen, run_server

    def fail(message: str) -> int:
        print(f"p5rec templates studio: {message}", file=sys.stderr)
        return 2

    try:
        studio = Studio.for_dataset(args.dataset, args.save_dir, args.file, args.id_form)
    except StudioError as exc:
        return fail(str(exc))
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        return fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})")
    try:
        host, port = sock.getsockname()[:2]
        logger.info("template studio on http://%s:%d/studio/ (records: %s; saves into %s)", host, port,
                    studio.dataset_label, studio.save_dir.resolve())
        if not is_loopback(args.host):
            logger.warning("the studio saves files into %s for anyone who reaches %s:%d", studio.save_dir.resolve(),
                           host, port)
        run_server(create_app(studio), sock)
    finally:
        sock.close()
    return 0
