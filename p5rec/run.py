"""One way to open a trained run: ``Run.open(dir)`` for ``p5rec evaluate``, ``P5Rec.from_pretrained`` and bench/.

A run directory (docs/design.md §5) holds the model, its tokenizer, ``run_config.json`` (every argument, the
render config, the templates the mixture trained), ``index.json`` and a copy of the prepared data's
``manifest.json``. The prepared data itself is opened from the path the run recorded, and only if its
fingerprint is the one the run trained on: scoring a model against re-prepared data (another seed, other
negatives, other ids) gives numbers that mean nothing, so it is refused with both fingerprints named.

Every file is checked before a library reads it (present, JSON that parses, a safetensors file as long as its
header says), so a missing or truncated file is one :class:`RunError` naming it, not whatever transformers makes of
it (a size-mismatch RuntimeError, "install sentencepiece or tiktoken"). :func:`check_checkpoint` does the same for
a Trainer checkpoint before ``--resume_from_checkpoint`` starts a run.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Weight files ``save_pretrained`` writes, in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# torch.save files a Trainer checkpoint may hold besides the weights.
CHECKPOINT_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin")


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message says which file and why."""


# ---------------------------------------------------------------------------------------------- file checks
def read_json(path: Path, expect: type = dict) -> Any:
    """The JSON value in ``path``, which must be an ``expect``; :class:`RunError` naming the file otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: unreadable ({exc})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}), truncated or corrupt") from None
    if not isinstance(value, expect):
        raise RunError(f"{path}: expected a JSON {expect.__name__}, found {type(value).__name__}")
    return value


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's framing without loading tensors: an 8-byte header length, a JSON header, and
    exactly as many bytes after it as the header's tensors span. A truncated copy fails here, naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise RunError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise RunError(f"{path}: corrupt safetensors header") from None
    if 8 + n + end != size:
        raise RunError(f"{path}: truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}")


def check_torch_file(path: Path) -> None:
    """Check a ``torch.save`` file without unpickling it: the zip container is complete and every member's CRC
    matches (a truncated file has no central directory). The legacy pickle format passes unchecked."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x80\x02":  # torch.save(..., _use_new_zipfile_serialization=False)
        return
    try:
        with zipfile.ZipFile(path) as z:
            broken = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise RunError(f"{path}: truncated or corrupt ({exc})") from None
    if broken is not None:
        raise RunError(f"{path}: corrupt (member {broken} fails its checksum)")


def weights_file(path: Path) -> Path:
    """The model weights of a run or checkpoint directory; :class:`RunError` if there are none."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise RunError(f"{path}: missing model.safetensors (no model weights); expected a directory written by train.py")


def check_weights(path: Path) -> Path:
    """``weights_file(path)``, checked (safetensors framing, or a complete torch file)."""
    weights = weights_file(path)
    if weights.name.endswith(".safetensors"):
        check_safetensors(weights)
    elif weights.name.endswith(".bin"):
        check_torch_file(weights)
    else:  # a sharded model: the index, then every shard it names
        shards = read_json(weights).get("weight_map", {})
        for shard in sorted(set(shards.values())):
            if not (path / shard).is_file():
                raise RunError(f"{path / shard}: missing (named by {weights.name})")
            check_safetensors(path / shard)
    return weights


def check_checkpoint(path: Path) -> None:
    """Check a Trainer checkpoint before resuming from it: ``trainer_state.json``, the weights, and every
    optimizer/scheduler/RNG file present. One :class:`RunError` naming the first bad file."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such checkpoint directory (--resume_from_checkpoint)")
    read_json(path / "trainer_state.json")
    if (path / "config.json").exists():
        read_json(path / "config.json")
    check_weights(path)
    for name in CHECKPOINT_TORCH_FILES:
        if (path / name).exists():
            check_torch_file(path / name)
    for rng in sorted(path.glob("rng_state_*.pth")):
        check_torch_file(rng)
    if not (path / "optimizer.pt").exists():
        logger.warning("%s has no optimizer.pt: training resumes with a fresh optimizer", path)


def read_run_config(path: Path) -> dict:
    """``run_config.json`` of a run directory, checked; :class:`RunError` naming it if missing or damaged."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    file = path / "run_config.json"
    if not file.exists():
        raise RunError(f"{path}: missing run_config.json; expected a run directory written by train.py")
    config = read_json(file)
    if not isinstance(config.get("render"), dict) or not isinstance(config.get("prepared_dir"), str):
        raise RunError(f"{file}: no 'render' settings or 'prepared_dir' (a partial file?); expected one written "
                       "by train.py")
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@dataclass
class Run:
    """A trained run opened for inference or evaluation. ``model`` is on ``device`` and in eval mode."""

    path: Path
    config: dict
    model: Any
    tokenizer: Any
    index: Any
    templates: Any
    render_config: Any
    _prepared: Any = field(default=None, repr=False)
    _trie: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, device: str | None = None) -> "Run":
        """Load a run directory (design.md §5). Every file is checked before a library reads it; a missing,
        truncated or unusable one is a :class:`RunError` whose one-line message names it."""
        import torch
        from transformers import AutoTokenizer

        from p5rec.data.indexing import Index
        from p5rec.train.model import P5T5ForConditionalGeneration
        from p5rec.prompts.templates import RenderConfig, TemplateError

        path = Path(path)
        config = read_run_config(path)
        for name in ("index.json", "config.json", "tokenizer.json"):
            if not (path / name).exists():
                raise RunError(f"{path}: missing {name}; expected a run directory written by train.py")
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).exists():
                read_json(path / name)
        weights = check_weights(path)
        try:
            index = Index.from_json(path / "index.json")
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path / 'index.json'}: not an index written by train.py ({_first_line(exc)})") from None
        try:
            render_config = RenderConfig(**config["render"])
        except (TypeError, ValueError) as exc:
            raise RunError(f"{path / 'run_config.json'}: bad 'render' settings ({exc})") from None
        try:
            templates = run_templates(config)
        except TemplateError as exc:
            raise RunError(f"{path / 'run_config.json'}: the run's template files do not load: {exc.problems[0]}"
                           f"{f' (and {len(exc.problems) - 1} more)' if len(exc.problems) > 1 else ''}") from None
        # The files are whole; what is left is a library refusing their content (say a tokenizer of another kind).
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the file is what matters
            raise RunError(f"{path / 'tokenizer.json'}: cannot load the tokenizer ({_first_line(exc)})") from None
        try:
            model = P5T5ForConditionalGeneration.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001
            raise RunError(f"{weights}: cannot load the model with {path / 'config.json'} "
                           f"({_first_line(exc)})") from None
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        return cls(path, config, model, tokenizer, index, templates, render_config)

    @property
    def max_source_length(self) -> int:
        return int(self.config.get("data", {}).get("max_source_length", 128))

    @property
    def trained_templates(self) -> set[str] | None:
        """Template ids the training mixture held (None for runs written before this was recorded)."""
        ids = self.config.get("mixture", {}).get("trained_templates")
        return None if ids is None else set(ids)

    @property
    def star_calibration(self) -> dict[str, tuple[float, float]]:
        """template id -> (intercept, slope) of the line its expected star is calibrated with, fitted on
        validation by the run's last test evaluation (``results.json``); {} before one. A ``results.json`` that
        does not read is said once in the log and ignored: serving does not need it."""
        results = self._last_results("rating calibration")
        try:
            templates = results.get("templates") or {}
            return {tid: (float(r["calibration"]["intercept"]), float(r["calibration"]["slope"]))
                    for tid, r in templates.items() if isinstance(r, dict) and r.get("calibration")}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("%s: no rating calibration read (%s)", self.path / "results.json", _first_line(exc))
            return {}

    @property
    def star_ensembles(self) -> dict[str, dict]:
        """family -> {"templates": ids, "line": (intercept, slope) or None}: the rating templates whose expected
        stars the run's last test evaluation averaged (``results.json``, ``star_ensembles``) and the line that
        calibrates the mean; {} before one, or when the file does not read (said once in the log)."""
        results = self._last_results("rating ensemble")
        try:
            found = results.get("star_ensembles") or {}
            return {fam: {"templates": [str(t) for t in e["templates"]],
                          "line": (float(e["calibration"]["intercept"]), float(e["calibration"]["slope"]))
                          if e.get("calibration") else None} for fam, e in found.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("%s: no rating ensemble read (%s)", self.path / "results.json", _first_line(exc))
            return {}

    def _last_results(self, what: str) -> dict:
        """The run's ``results.json`` (its last full test evaluation); {} when there is none, or when it does not
        read (said in the log as ``no <what> read``)."""
        path = self.path / "results.json"
        if not path.exists():
            return {}
        try:
            return read_json(path)
        except RunError as exc:
            logger.warning("%s: no %s read (%s)", path, what, _first_line(exc))
            return {}

    @property
    def fingerprint(self) -> str | None:
        manifest = self.path / "manifest.json"
        return read_json(manifest).get("fingerprint") if manifest.exists() else None

    def prepared(self):
        """The prepared data the run trained on; :class:`RunError` if it moved or changed since."""
        if self._prepared is None:
            self._prepared = open_prepared_for(self.config, self.fingerprint, self.path)
        return self._prepared

    @property
    def trie(self):
        """The catalogue trie over the run's item surfaces (built once)."""
        if self._trie is None:
            from p5rec.eval.decoding import ItemTrie

            form = self.render_config.id_form
            self._trie = ItemTrie.from_surfaces(
                self.tokenizer, {raw: self.index.item_text(raw, form) for raw in self.index.items})
        return self._trie


def run_templates(config: dict):
    """The shipped templates plus the run's own ``--template_files``, as it trained with them."""
    from p5rec.prompts.templates import load_templates

    extra = config.get("data", {}).get("template_files")
    return load_templates(paths=[Path(p) for p in extra.split(",")] if extra else None)


def open_prepared_for(config: dict, fingerprint: str | None, where: Path):
    """Open ``config["prepared_dir"]`` and check its fingerprint against the run's (``where`` names the run)."""
    from p5rec.data.prepare import PreparedError, load_prepared

    prepared_dir = Path(config["prepared_dir"])
    try:
        prepared = load_prepared(prepared_dir)
    except FileNotFoundError as exc:
        raise RunError(f"{where}: the run trained on {prepared_dir}, which is gone ({exc})") from None
    except PreparedError as exc:
        raise RunError(f"{where}: the prepared data the run trained on is damaged: {exc}") from None
    found = prepared.manifest.get("fingerprint")
    if fingerprint and found != fingerprint:
        raise RunError(
            f"{where}: the prepared data at {prepared_dir} changed since training (fingerprint {found[:12]}, the "
            f"run trained on {fingerprint[:12]}); prepare it again with the run's settings (manifest.json in the "
            "run) or evaluate another run")
    return prepared
