"""One way to open a trained run: ``Run.open(dir)`` for ``p5rec evaluate``, ``P5Rec.from_pretrained`` and bench/.

A run directory (docs/design.md §5) holds the model, its tokenizer, ``run_config.json`` (every argument, the
render config, the templates the mixture trained), ``index.json`` and a copy of the prepared data's
``manifest.json``. The prepared data itself is opened from the path the run recorded, and only if its
fingerprint is the one the run trained on: scoring a model against re-prepared data (another seed, other
negatives, other ids) gives numbers that mean nothing, so it is refused with both fingerprints named.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message says which file and why."""


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
        import torch
        from transformers import AutoTokenizer

        from p5rec.indexing import Index
        from p5rec.model import P5T5ForConditionalGeneration
        from p5rec.templates import RenderConfig

        path = Path(path)
        for name in ("run_config.json", "index.json", "config.json"):
            if not (path / name).exists():
                raise RunError(f"{path}: missing {name}; expected a run directory written by train.py")
        config = json.loads((path / "run_config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = P5T5ForConditionalGeneration.from_pretrained(str(path))
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        render_config = RenderConfig(**config["render"])
        return cls(path, config, model, tokenizer, Index.from_json(path / "index.json"),
                   run_templates(config), render_config)

    @property
    def max_source_length(self) -> int:
        return int(self.config.get("data", {}).get("max_source_length", 128))

    @property
    def trained_templates(self) -> set[str] | None:
        """Template ids the training mixture held (None for runs written before this was recorded)."""
        ids = self.config.get("mixture", {}).get("trained_templates")
        return None if ids is None else set(ids)

    @property
    def fingerprint(self) -> str | None:
        manifest = self.path / "manifest.json"
        return json.loads(manifest.read_text()).get("fingerprint") if manifest.exists() else None

    def prepared(self):
        """The prepared data the run trained on; :class:`RunError` if it moved or changed since."""
        if self._prepared is None:
            self._prepared = open_prepared_for(self.config, self.fingerprint, self.path)
        return self._prepared

    @property
    def trie(self):
        """The catalogue trie over the run's item surfaces (built once)."""
        if self._trie is None:
            from p5rec.decoding import ItemTrie

            form = self.render_config.id_form
            self._trie = ItemTrie.from_surfaces(
                self.tokenizer, {raw: self.index.item_text(raw, form) for raw in self.index.items})
        return self._trie


def run_templates(config: dict):
    """The shipped templates plus the run's own ``--template_files``, as it trained with them."""
    from p5rec.templates import load_templates

    extra = config.get("data", {}).get("template_files")
    return load_templates(paths=[Path(p) for p in extra.split(",")] if extra else None)


def open_prepared_for(config: dict, fingerprint: str | None, where: Path):
    """Open ``config["prepared_dir"]`` and check its fingerprint against the run's (``where`` names the run)."""
    from p5rec.prepare import load_prepared

    prepared_dir = Path(config["prepared_dir"])
    try:
        prepared = load_prepared(prepared_dir)
    except FileNotFoundError as exc:
        raise RunError(f"{where}: the run trained on {prepared_dir}, which is gone ({exc})") from None
    found = prepared.manifest.get("fingerprint")
    if fingerprint and found != fingerprint:
        raise RunError(
            f"{where}: the prepared data at {prepared_dir} changed since training (fingerprint {found[:12]}, the "
            f"run trained on {fingerprint[:12]}); prepare it again with the run's settings (manifest.json in the "
            "run) or evaluate another run")
    return prepared
