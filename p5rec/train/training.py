"""Multitask training: prepared dataset -> rendered mixture -> tokenizer -> T5 -> Seq2SeqTrainer -> run directory.

The pipeline reads top to bottom in :func:`run`. Arguments are three dataclasses parsed by ``HfArgumentParser``
(from the command line, or from one JSON/YAML file), as in the transformers seq2seq examples. The defaults are the
main job: the embedded Musical Instruments dataset, the ``mini`` preset, a step budget measured to finish the
whole job (prepare, train, evaluate) in under 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from p5rec import atomic
from p5rec.prompts.families import main_families, main_renders

logger = logging.getLogger(__name__)


ID_INITS = ("auto", "random", "collaborative", "typed", "typed-collaborative")


@dataclass
class ModelArguments:
    preset: str = field(default="mini", metadata={"help": "T5 shape: tiny, mini (CPU default), compact, small, base"})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "local pretrained T5 directory (overrides --preset); never downloaded"}
    )
    vocab_size: int = field(default=4000, metadata={"help": "SentencePiece vocabulary size (before id tokens)"})
    id_form: str = field(default="token", metadata={"help": "token: one vocab token per id; text: P5's item_123"})
    dropout_rate: Optional[float] = field(default=None, metadata={"help": "override the preset's dropout"})
    d_model: Optional[int] = field(default=None, metadata={"help": "override the preset's width"})
    d_ff: Optional[int] = field(default=None, metadata={"help": "override the preset's feed-forward width"})
    num_layers: Optional[int] = field(default=None, metadata={"help": "override the preset's encoder layers"})
    num_decoder_layers: Optional[int] = field(default=None, metadata={"help": "override the preset's decoder layers"})
    num_heads: Optional[int] = field(default=None, metadata={"help": "override the preset's attention heads"})
    embedding_init_std: Optional[float] = field(
        default=None,
        metadata={"help": "std of the shared embedding at initialisation (HF T5: 1.0); 0.1 is SASRec's scale"},
    )
    embedding_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "learning rate of the shared embedding relative to the rest. T5 scales the decoder output "
                  "by d_model^-0.5 and not the input, so under Adam an embedding moves sqrt(d_model) times slower "
                  "relative to its size than in SASRec; sqrt(d_model) restores SASRec's dynamics"},
    )
    id_embedding_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "learning rate of the id-token rows (users, items) of the shared embedding relative to "
                  "the rest (on top of --embedding_lr_multiplier). Word rows keep theirs: an id row is trained "
                  "only by the prompts that name it, and at T5's scale it barely leaves its random start in the "
                  "main job's budget (bench/README.md)"},
    )
    id_embedding_init_std: Optional[float] = field(
        default=None,
        metadata={"help": "std of the id-token rows at initialisation (default: as the rest of the embedding)"},
    )
    id_embedding_init: str = field(
        default="auto",
        metadata={"help": "auto (default): typed-collaborative where every id is one token of a model built here, "
                  "else random (measured on MI validation: yes/no NDCG@10 .045 -> .079, bench/README.md); random; "
                  "collaborative: the first --id_embedding_init_dims columns of each user and "
                  "item row start from the training interactions (log-count, rating bias, spectral factors of "
                  "the user-item matrix); typed: every item row one shared vector plus --id_type_noise noise "
                  "(users: another); typed-collaborative: both (p5rec/train/warmstart.py)"},
    )
    id_embedding_init_dims: int = field(
        default=16, metadata={"help": "coordinates written by --id_embedding_init collaborative"}
    )
    id_type_noise: float = field(
        default=0.2, metadata={"help": "typed id inits: per-id noise around the shared item (user) vector, relative "
                               "to the embedding's scale"}
    )
    item_softmax: bool = field(
        default=False,
        metadata={"help": "where the label is an item token, softmax over item tokens only (token id form)"},
    )

    item_output_rows: str = field(
        default="tied",
        metadata={"help": "tied (T5's): an item token's output row is its input embedding; separate: item tokens "
                  "get output rows of their own (started as copies), so that the families answering with items "
                  "do not pull on the embeddings the encoder reads (token id form)",
                  "choices": ["tied", "separate"]},
    )
    loss_reduction: str = field(
        default="token",
        metadata={"help": "token (stock T5's): the loss is the mean over the batch's label tokens, so a family weighs "
                  "in by its label tokens (in the main job explanation holds 57 % of them, direct 4 %); example "
                  "(P5's): each row's mean over its label tokens, then the mean over rows, so every example "
                  "counts once",
                  "choices": ["token", "example"]},
    )
    family_adapter_dim: int = field(
        default=0,
        metadata={"help": "capacity per task family: a residual adapter this wide for each trained family after "
                  "every block of --family_adapter_stacks, each row routed through its own family's (0: none; "
                  "p5rec.train.model.FamilyAdapters)"},
    )
    family_loss_weights: str = field(
        default="",
        metadata={"help": "loss weight per family, family=weight comma-separated (default 1), e.g. rating=2,review=0.5: "
                  "each row's loss terms are multiplied by its family's weight"},
    )

    def loss_weight_map(self) -> dict[str, float]:
        out = {}
        for part in filter(str.strip, self.family_loss_weights.split(",")):
            name, _, w = part.partition("=")
            try:
                weight = float(w)
            except ValueError:
                weight = -1.0
            if not name.strip() or not weight >= 0:
                raise ValueError(f"--family_loss_weights: expected family=weight (a number >= 0), got {part!r}")
            out[name.strip()] = weight
        return out

    family_adapter_stacks: str = field(
        default="decoder", metadata={"help": "where the family adapters go: encoder, decoder or encoder,decoder"}
    )

    def adapter_stacks(self) -> list[str]:
        return [s.strip() for s in self.family_adapter_stacks.split(",") if s.strip()]

    def shape_overrides(self) -> dict:
        names = ("d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __post_init__(self):
        from p5rec.train.model import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: choose one of {sorted(PRESETS)}")
        if self.id_form not in ("token", "text"):
            raise ValueError(f"--id_form {self.id_form!r}: choose token or text")
        if self.id_form != "token" and (self.id_embedding_lr_multiplier != 1.0 or self.id_embedding_init_std):
            raise ValueError("--id_embedding_lr_multiplier and --id_embedding_init_std need id tokens (--id_form token)")
        if self.id_embedding_init not in ID_INITS:
            raise ValueError(f"--id_embedding_init {self.id_embedding_init!r}: choose one of {', '.join(ID_INITS)}")
        if self.id_embedding_init not in ("auto", "random") and self.id_form != "token":
            raise ValueError(f"--id_embedding_init {self.id_embedding_init} needs id tokens (--id_form token)")
        if self.id_embedding_lr_multiplier <= 0 or self.embedding_lr_multiplier <= 0:
            raise ValueError("--embedding_lr_multiplier and --id_embedding_lr_multiplier must be positive")
        if self.item_output_rows == "separate" and self.id_form != "token":
            raise ValueError("--item_output_rows separate needs one token per item (--id_form token)")
        self.loss_weight_map()  # a malformed --family_loss_weights fails here, with the flag's name
        if self.family_adapter_dim < 0:
            raise ValueError(f"--family_adapter_dim {self.family_adapter_dim}: expected 0 (none) or a positive width")
        bad = [s for s in self.adapter_stacks() if s not in ("encoder", "decoder")] or (
            [] if self.adapter_stacks() else [self.family_adapter_stacks])
        if bad:
            raise ValueError(f"--family_adapter_stacks: unknown {bad}; expected encoder, decoder or encoder,decoder")
        if self.model_name_or_path:
            from p5rec.train.model import checkpoint_problem

            problem = checkpoint_problem(self.model_name_or_path)
            if problem:
                raise ValueError(f"--model_name_or_path: {problem}")
            if self.family_adapter_dim and not _config_of(self.model_name_or_path).get("family_adapters"):
                raise ValueError(f"--family_adapter_dim: {self.model_name_or_path} has no family adapters; they are "
                                 "built with a model trained from scratch (a run with adapters keeps them when "
                                 "continued)")


def _config_of(checkpoint: str) -> dict:
    """The checkpoint's config.json (checked to exist by ``checkpoint_problem``); {} when it does not parse."""
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class DataArguments:
    dataset: str = field(
        default="amazon2014-musical-instruments",
        metadata={"help": "registered dataset name or a path to raw files (see `p5rec data list`)"},
    )
    data_format: Optional[str] = field(default=None, metadata={"help": "reader for --dataset paths (auto-detected)"})
    prepared_dir: Optional[str] = field(
        default=None, metadata={"help": "an existing `p5rec data prepare` output; skips preparation"}
    )
    index: str = field(default="random", metadata={"help": "item id strategy: random, sequential, collaborative"})
    review_split: str = field(
        default="leave-one-out",
        metadata={"help": "how rating, review and explanation rows are split: leave-one-out as the sequences (a "
                  "user's last review is test; no family trains on another's test pair), or ratio, P5's random "
                  "8:1:1 (most sequential test targets are then training reviews)",
                  "choices": ["leave-one-out", "ratio"]},
    )
    k_core: int = field(default=5, metadata={"help": "iterative k-core filter"})
    families: str = field(  # the main job's families: `train: true` in tasks/<family>/templates.yaml
        default=",".join(main_families()), metadata={"help": "comma-separated task families"}
    )
    renders: str = field(  # each main-job family's `renders:`; a family it does not name takes its own
        default=main_renders(),
        metadata={"help": "prompts rendered per training record, per family (default: each family's `renders:`)"},
    )
    candidate_template_weight: float = field(
        default=0.3,
        metadata={"help": "sampling weight of templates that list 100 candidates (~4x the tokens of the others; "
                  "restricted decoding already confines their answers to the candidates)"},
    )
    template_weights: str = field(
        default="",
        metadata={"help": "sampling weight of templates within their family, id=weight comma-separated (default: "
                  "the template's `weight:`, else 1; candidate-list templates take --candidate_template_weight), "
                  "e.g. 3-9=3,3-10=3"},
    )
    batch_grouping: str = field(
        default="length",
        metadata={"help": "length: each batch of rows of similar length, families mixed; family: each batch from one "
                  "family (then by length), batches in random order, to measure whether families interfere "
                  "within a batch",
                  "choices": ["length", "family"]},
    )
    max_review_words: int = field(default=32, metadata={"help": "review words shown in review prompts"})
    max_history: int = field(default=20, metadata={"help": "most recent items shown in a history"})
    sequence_renders: Optional[int] = field(
        default=None,
        metadata={"help": "training rows per user for `sequence` templates (the target is the user's item "
                  "sequence: one row trains every position of it); 0 leaves them out. Default: 1 when "
                  "--templates names one, else 0 (the main job's mixture: with T5's embedding defaults they cost "
                  "the other families, and the recipe that makes them learn breaks the text families; "
                  "bench/README.md)"},
    )
    max_sequence: int = field(default=50, metadata={"help": "most recent items in a `sequence` target"})
    sequence_eos: bool = field(
        default=False, metadata={"help": "end `sequence` targets with EOS (teaches the last position to stop)"}
    )
    anonymous_users: bool = field(
        default=False,
        metadata={"help": "render every user as 'a user': no user ids in prompts and no user tokens (SASRec's "
                  "setting; P5 gives each user a token)"},
    )
    max_source_length: int = field(default=128, metadata={"help": "prompt tokens kept"})
    max_target_length: int = field(default=32, metadata={"help": "target tokens kept"})
    template_files: Optional[str] = field(default=None, metadata={"help": "extra templates.yaml files, comma-separated"})
    templates: Optional[str] = field(
        default=None,
        metadata={"help": "template ids to train, comma-separated (default: every seen template of --families)"},
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "prepared data and tokenized mixture cache"})
    eval_users: int = field(default=200, metadata={"help": "validation users/rows per family for the learning curve"})
    test_max_cases: int = field(
        default=0, metadata={"help": "cap test cases per template in the final evaluation (0: all)"}
    )
    test_max_candidate_cases: int = field(
        default=200, metadata={"help": "users for yes/no-per-candidate templates (each costs 100 prompts; 0: all)"}
    )
    skip_test: bool = field(default=False, metadata={"help": "train only; evaluate later with `p5rec evaluate`"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "replace the p5rec run already in --output_dir (its files are removed first; other files "
                  "stay). Without it a non-empty --output_dir is refused unless --resume_from_checkpoint names a "
                  "checkpoint inside it"},
    )
    sasrec_baseline: bool = field(
        default=True, metadata={"help": "train SASRec on the same split as the sequential family's baseline"}
    )

    def __post_init__(self):
        if self.index not in ("random", "sequential", "collaborative"):
            raise ValueError(f"--index {self.index!r}: choose random, sequential or collaborative")

    def template_list(self) -> list[str] | None:
        return [t.strip() for t in self.templates.split(",") if t.strip()] if self.templates else None

    def sequence_render_count(self, templates) -> int:
        """``sequence_renders``, or its default: 1 if ``--templates`` names a ``sequence`` template, else 0."""
        if self.sequence_renders is not None:
            return self.sequence_renders
        named = self.template_list() or ()
        return int(any(t in templates and templates.get(t).scoring == "sequence" for t in named))

    def family_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.families.split(",") if f.strip())

    def render_counts(self) -> dict[str, int]:
        out = {}
        for part in self.renders.split(","):
            name, _, n = part.partition("=")
            if not n.strip().isdigit():
                raise ValueError(f"--renders: expected family=N, got {part!r}")
            out[name.strip()] = int(n)
        return out

    def template_weight_map(self) -> dict[str, float]:
        """``--template_weights`` as {template id: weight}."""
        out = {}
        for part in filter(str.strip, self.template_weights.split(",")):
            name, _, w = part.partition("=")
            try:
                weight = float(w)
            except ValueError:
                weight = -1.0
            if not name.strip() or not weight >= 0:
                raise ValueError(f"--template_weights: expected template_id=weight (a number >= 0), got {part!r}")
            out[name.strip()] = weight
        return out


# Main-job defaults for Seq2SeqTrainingArguments; any flag on the command line overrides them.
TRAINING_DEFAULTS = dict(
    output_dir="",
    max_steps=2500,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=128,
    learning_rate=1e-3,  # 3e-3 until 2026-12-04: the ranking families did not read their prompts (bench/README.md)
    lr_scheduler_type="cosine",
    warmup_steps=100,
    weight_decay=0.01,
    logging_steps=50,
    eval_strategy="steps",
    eval_steps=625,
    save_strategy="steps",
    save_steps=1250,
    save_total_limit=2,
    seed=42,
    report_to="none",  # --report_to tensorboard (or any integration installed) logs loss and per-family metrics
    ddp_find_unused_parameters=False,  # several processes: every T5 parameter is used in every step
    dataloader_num_workers=0,
    dataloader_pin_memory=False,
    train_sampling_strategy="group_by_length",
    disable_tqdm=False,
)


def _after_parent_run(parent: Path, prepared, trained: list[str], mix_info: dict) -> list[str]:
    """A run that starts from another p5rec run (a second stage) on the same data has trained the parent's
    templates too: they stay "seen" for the evaluation. A parent with another id index (another dataset, --index
    or --seed) gave its id tokens to other users and items: said once in the log and in the run config."""
    cfg_path, index_path = parent / "run_config.json", parent / "index.json"
    if not (cfg_path.exists() and index_path.exists()):
        return trained  # a plain T5 checkpoint, not a p5rec run
    same = index_path.read_bytes() == (Path(prepared.path) / "index.json").read_bytes()
    mix_info["parent_run"] = {"path": str(parent), "same_index": same}
    if not same:
        logger.warning("%s was trained with another id index (another dataset, --index or --seed): its id tokens "
                       "now name other users and items, and its templates do not count as trained here", parent)
        return trained
    from p5rec.run import RunError

    try:
        parent_trained = json.loads(cfg_path.read_text()).get("mixture", {}).get("trained_templates") or []
    except (json.JSONDecodeError, AttributeError) as exc:
        raise RunError(f"{cfg_path}: not a run config written by train.py ({exc})") from None
    mix_info["parent_run"]["trained_templates"] = parent_trained
    return sorted(set(trained) | set(parent_trained))


def _check_flags(dargs: DataArguments, targs, margs: ModelArguments | None = None) -> None:
    unknown = sorted(set(margs.loss_weight_map()) - set(dargs.family_list())) if margs else []
    if unknown:
        raise ValueError(f"--family_loss_weights: {unknown} not among the trained families (--families "
                         f"{dargs.families})")
    if dargs.batch_grouping == "family" and str(targs.train_sampling_strategy) != "group_by_length":
        raise ValueError("--batch_grouping family sorts the length-grouped sampler's mega-batches: it needs "
                         f"--train_sampling_strategy group_by_length (got {targs.train_sampling_strategy})")


def parse_args(argv: list[str] | None = None):
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def default_output_dir(margs: ModelArguments, dargs: DataArguments) -> str:
    name = Path(dargs.dataset).name.replace(".json.gz", "")
    return str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{margs.preset}-{dargs.index}")


def resolve_id_init(margs: ModelArguments, prepared, model_name_or_path: str | None = None) -> str:
    """The id-row start a run uses. ``auto`` (the default) is typed-collaborative where every id is one token of a
    model built here, and random otherwise (ids as text, collaborative multi-level ids, a pretrained checkpoint
    whose rows are kept as they are); asked for by name where it cannot apply, it is an error."""
    flat = margs.id_form == "token" and not any("-" in v for v in prepared.index.items.values())
    if margs.id_embedding_init == "auto":
        if not flat or model_name_or_path:
            return "random"
        return "typed-collaborative" if prepared.has_family("sequential") else "typed"
    if margs.id_embedding_init != "random" and not flat:
        raise ValueError(f"--id_embedding_init {margs.id_embedding_init} needs one token per item (--id_form token "
                         "with --index random or sequential)")
    return margs.id_embedding_init


def prepare_data(dargs: DataArguments, seed: int):
    """Prepare (or reuse a cached preparation of) the dataset; return the PreparedDataset."""
    from p5rec.prompts.mixture import default_cache_dir
    from p5rec.data.prepare import load_prepared, prepare, review_split_of

    if dargs.prepared_dir:
        prepared = load_prepared(Path(dargs.prepared_dir))
        split = review_split_of(prepared.manifest)
        if split != dargs.review_split:  # the preparation decides; the run's config says what it used
            logger.info("--prepared_dir %s splits its reviews by %s; --review_split %s does not apply",
                        dargs.prepared_dir, split, dargs.review_split)
            dargs.review_split = split
        return prepared
    cache = Path(dargs.cache_dir) if dargs.cache_dir else default_cache_dir()
    name = Path(dargs.dataset).name.replace(".", "_")
    out = cache / "prepared" / f"{name}-{dargs.index}-k{dargs.k_core}-seed{seed}-{dargs.review_split}"
    if not (out / "manifest.json").exists():
        try:
            prepare(dargs.dataset, out, fmt=dargs.data_format, k=dargs.k_core, index=dargs.index, seed=seed,
                    review_split=dargs.review_split)
        except FileExistsError:
            if not (out / "manifest.json").exists():
                raise
            logger.info("another process prepared %s meanwhile; using it", out)  # same settings, same content
    else:
        logger.info("using prepared data %s", out)
    return load_prepared(out)


# What a run writes at the top of its directory (design.md §5), and nothing else: `--overwrite_output_dir` removes
# exactly these, so a user's own file in the directory survives a re-run.
RUN_FILES = (
    "run_config.json", "versions.json", "manifest.json", "index.json", "train_log.txt", "train_results.json",
    "learning_curve.json", "learning_curve.png", "results.json", "results.md", "results.png", "config.json",
    "generation_config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "trainer_state.json", "training_args.bin", "all_results.json", "eval_results.json",
    "runs",  # --report_to tensorboard: the Trainer's event files, runs/<time>_<host>/
)
RUN_PATTERNS = ("checkpoint-*", "results-*.json", "results-*.md", "results-*.png", "model-*-of-*.safetensors")


class OutputDirError(FileExistsError):
    """A --output_dir that training must not write into as asked; the message says why and what to pass."""


def is_run_file(path: Path) -> bool:
    """Whether ``path`` (an entry at the top of a run directory) is one a p5rec run writes. ``README.md`` is the
    run's model card only if p5rec wrote it (:func:`p5rec.eval.modelcard.is_generated`); a README of the user's is not."""
    if path.name == "README.md":
        from p5rec.eval.modelcard import is_generated

        return is_generated(path)
    return path.name in RUN_FILES or any(path.match(pattern) for pattern in RUN_PATTERNS)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete Trainer checkpoint. The Trainer writes ``trainer_state.json`` last (after
    the weights, optimizer, scheduler and RNG states), so a checkpoint killed half-way has none, or a truncated
    one that does not parse."""
    try:
        json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir`` (half-written ones skipped), or None: what to
    pass as ``--resume_from_checkpoint`` after a crash."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and is_checkpoint(p)]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def check_output_dir(run_dir: Path, resume_from_checkpoint: str | None, overwrite: bool) -> bool:
    """Decide, before anything is written, whether training may write into ``run_dir``; True if the files of an
    earlier run must be cleared first (:func:`clear_run_files`).

    A missing or empty directory is free. A non-empty one is written into only when resuming from a complete
    checkpoint inside it (the run continues where it stopped), or with ``overwrite`` when it holds a p5rec run
    (its run files go, other files stay); a non-empty directory that is not a run is never written into. A
    ``resume_from_checkpoint`` that is not a complete checkpoint is refused whatever the directory holds.
    Raises :class:`OutputDirError` or ``FileNotFoundError`` with one-line messages.
    """
    run_dir = Path(run_dir)
    if resume_from_checkpoint:
        checkpoint = Path(resume_from_checkpoint)
        if not is_checkpoint(checkpoint):
            why = "no such directory" if not checkpoint.is_dir() else "incomplete: no readable trainer_state.json"
            last = last_checkpoint(run_dir) if run_dir.is_dir() else None
            hint = f"; the last complete checkpoint in {run_dir} is {last}" if last else ""
            raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: not a checkpoint ({why}){hint}; "
                                    f"nothing in {run_dir} was changed")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputDirError(f"--output_dir {run_dir} exists and is not a directory")
    entries = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    if not entries:
        return False
    inside = bool(resume_from_checkpoint) and Path(resume_from_checkpoint).resolve().is_relative_to(run_dir.resolve())
    if inside:
        if overwrite:
            raise OutputDirError(f"--overwrite_output_dir would delete {resume_from_checkpoint}, the checkpoint to "
                                 "resume from; pass one of the two")
        return False
    # a run, or one killed before its run_config.json (train_log.txt is the first file a run writes)
    is_run = (run_dir / "run_config.json").is_file() or (
        (run_dir / "train_log.txt").is_file() and all(is_run_file(p) for p in entries))
    shown = ", ".join(p.name for p in entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    if not is_run:
        raise OutputDirError(f"--output_dir {run_dir} is not empty and is not a p5rec run (it holds {shown}); "
                             "choose another --output_dir")
    if not overwrite:
        raise OutputDirError(f"--output_dir {run_dir} already holds a run ({shown}); pass --overwrite_output_dir "
                             "true to replace it, --resume_from_checkpoint with one of its checkpoints to continue "
                             "it, or choose another --output_dir")
    return True


def clear_run_files(run_dir: Path) -> list[Path]:
    """Remove what an earlier run wrote at the top of ``run_dir`` (:data:`RUN_FILES`, :data:`RUN_PATTERNS`), so a
    new run never mixes with an old one; anything else is kept and named in a warning. Returns what was removed."""
    removed, kept = [], []
    for entry in sorted(Path(run_dir).iterdir()):
        if not is_run_file(entry):
            kept.append(entry.name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    logger.warning("--overwrite_output_dir: removed %d files of the earlier run in %s%s", len(removed), run_dir,
                   f"; kept {', '.join(kept)} (not written by p5rec)" if kept else "")
    return removed


def run(margs: ModelArguments, dargs: DataArguments, targs) -> Path:
    """The whole job; returns the run directory."""
    import torch
    from transformers import DataCollatorForSeq2Seq, set_seed

    from p5rec.eval import modelcard, plots
    from p5rec.train.callbacks import LearningCurveCallback
    from p5rec.eval.evaluation import curve_metrics
    from p5rec.prompts.mixture import MixtureSpec, build_mixture, column, id_tokens
    from p5rec.train.model import build_model, item_token_range, load_checkpoint_tokenizer, load_pretrained
    from p5rec.train.trainer import FAMILY_MEGA_BATCHES, MEGA_BATCHES, P5Trainer
    from p5rec.prompts.templates import RenderConfig, load_templates

    started = time.time()
    if not targs.output_dir:
        name = [default_output_dir(margs, dargs)]
        if targs.world_size > 1:  # the main process's name: the clocks of the others may be a second apart
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(name, from_process=0)
        targs.output_dir = name[0]
    run_dir = Path(targs.output_dir)
    # Several processes (accelerate launch, torchrun): all train, one writes. The main process (global rank 0)
    # alone writes the run directory, the learning curve, the results, the plots and the model card; the cached
    # preparation and mixture are built by each machine's first process while the others wait, then loaded.
    is_main = targs.process_index == 0
    if not is_main:
        logging.getLogger().setLevel(targs.get_process_log_level())
    # before anything is written there: a refused or failed resume leaves the directory exactly as it was. Every
    # process checks (the same answer everywhere, so all stop together), then they wait for each other, so the
    # main process's first file cannot make the directory look taken to a slower one.
    clear = check_output_dir(run_dir, targs.resume_from_checkpoint, dargs.overwrite_output_dir)
    if isinstance(targs.resume_from_checkpoint, str) and targs.resume_from_checkpoint:
        from p5rec.run import check_checkpoint

        check_checkpoint(Path(targs.resume_from_checkpoint))  # a damaged file fails now, not after data and mixture
    _wait_for_everyone(targs)
    if is_main:
        if clear:
            clear_run_files(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _add_file_log(run_dir / "train_log.txt")
    if targs.world_size > 1:
        logger.info("process %d of %d (%s); the main process writes %s", targs.process_index, targs.world_size,
                    targs.parallel_mode, run_dir)
    set_seed(targs.seed)

    with targs.main_process_first(local=True, desc="data preparation and tokenized mixture"):
        prepared = prepare_data(dargs, targs.seed)
    extra = [Path(p) for p in dargs.template_files.split(",")] if dargs.template_files else None
    templates = load_templates(paths=extra)
    unknown = [t for t in dargs.template_list() or () if t not in templates]
    if unknown:
        raise ValueError(f"--templates: unknown template ids {unknown} (see `p5rec templates list`)")
    render_config = RenderConfig(
        seed=targs.seed,
        id_form=margs.id_form,
        max_history=dargs.max_history,
        renders=_render_counts(dargs, templates),
        max_review_words=dargs.max_review_words,
        anonymous_users=dargs.anonymous_users,
        max_sequence=dargs.max_sequence,
        sequence_renders=dargs.sequence_render_count(templates),
        template_ids=dargs.template_list(),
        template_weights=_template_weights(dargs, templates),
    )
    spec = MixtureSpec(
        families=dargs.family_list(),
        vocab_size=margs.vocab_size,
        max_source_length=dargs.max_source_length,
        max_target_length=dargs.max_target_length,
        sequence_eos=dargs.sequence_eos,
    )
    cache_dir = Path(dargs.cache_dir) if dargs.cache_dir else None
    t0 = time.time()
    # A checkpoint passed by path brings its own tokenizer: its embedding rows belong to that tokenizer's ids.
    given = load_checkpoint_tokenizer(margs.model_name_or_path) if margs.model_name_or_path else None
    with targs.main_process_first(local=True, desc="data preparation and tokenized mixture"):
        tokenizer, train, valid, mix_info = build_mixture(prepared, templates, render_config, spec, cache_dir,
                                                          tokenizer=given)
    mix_info["seconds"] = round(time.time() - t0, 2)
    logger.info("mixture: %d train rows, %d valid rows (%.1fs)", len(train), len(valid), mix_info["seconds"])

    set_seed(targs.seed)  # the model's initial weights depend only on the seed
    ids = id_tokens(prepared.index, margs.id_form, users=not dargs.anonymous_users)
    if margs.model_name_or_path:
        model, tokenizer = load_pretrained(margs.model_name_or_path, tokenizer, ids)
    else:
        adapters = ({"families": list(spec.families), "dim": margs.family_adapter_dim,
                     "stacks": margs.adapter_stacks()} if margs.family_adapter_dim else None)
        model = build_model(margs.preset, tokenizer, margs.dropout_rate, margs.embedding_init_std,
                            family_adapters=adapters, **margs.shape_overrides())
    id_rows = sorted(set(tokenizer.convert_tokens_to_ids(ids))) if ids else []
    if margs.id_embedding_init_std is not None and id_rows and not targs.resume_from_checkpoint:
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[id_rows] = torch.randn(len(id_rows), weight.shape[1]) * margs.id_embedding_init_std
    id_init = resolve_id_init(margs, prepared, model_name_or_path=margs.model_name_or_path)
    mix_info["id_embedding_init"] = id_init
    if id_init != "random" and not targs.resume_from_checkpoint:
        from p5rec.train.warmstart import prepared_vectors, write_rows

        collab = id_init in ("collaborative", "typed-collaborative")
        mix_info["id_rows_written"] = write_rows(
            model.get_input_embeddings().weight, tokenizer, prepared.index,
            prepared_vectors(prepared, margs.id_embedding_init_dims, targs.seed) if collab else None,
            users=not dargs.anonymous_users, typed=margs.id_type_noise if "typed" in id_init else 0.0,
            seed=targs.seed)
    if margs.item_output_rows == "separate" and not getattr(model.config, "item_output_rows", None):
        span = item_token_range(tokenizer, prepared.index.item_tokens(margs.id_form))
        if span is None:
            raise ValueError("--item_output_rows separate needs one added token per item (--id_form token)")
        model.set_item_output_rows(span)  # after the id rows are written: the output rows start from them
    model.config.loss_reduction = margs.loss_reduction
    weights = margs.loss_weight_map()
    if weights:
        names = getattr(model, "family_names", None) or list(spec.families)
        model.config.family_loss_weights = {f: weights.get(f, 1.0) for f in names}
    if margs.item_softmax:
        span = item_token_range(tokenizer, prepared.index.item_tokens(margs.id_form))
        if span is None:
            raise ValueError("--item_softmax needs one added token per item or id level (--id_form token)")
        model.config.item_token_range = span
    trained = sorted(set(column(train, "template")))
    if margs.model_name_or_path:
        trained = _after_parent_run(Path(margs.model_name_or_path), prepared, trained, mix_info)
    mix_info["trained_templates"] = trained

    if is_main:
        _write_run_files(run_dir, margs, dargs, targs, prepared, render_config, spec, mix_info, model)
        tokenizer.save_pretrained(str(run_dir))

    if getattr(model, "family_names", None):  # each row routed through its family's adapters
        train, valid = _with_family_ids(train, model.family_names), _with_family_ids(valid, model.family_names)
    text_cols = [c for c in train.column_names if c not in ("input_ids", "attention_mask", "labels", "family_ids")]
    curve = LearningCurveCallback(
        run_dir=run_dir,
        prepared=prepared,
        tokenizer=tokenizer,
        templates=templates,
        render_config=render_config,
        families=spec.families,
        n_users=dargs.eval_users,
        max_source_length=dargs.max_source_length,
        trained=set(trained),
    )
    by_family = dargs.batch_grouping == "family"
    trainer = P5Trainer(
        embedding_lr_multiplier=margs.embedding_lr_multiplier,
        id_rows=id_rows if margs.id_embedding_lr_multiplier != 1.0 else None,
        id_lr_multiplier=margs.id_embedding_lr_multiplier,
        train_lengths=_grouping_keys(train, dargs.batch_grouping),
        train_mega_batches=FAMILY_MEGA_BATCHES if by_family else MEGA_BATCHES,
        shuffle_batches=by_family,
        model=model,
        args=targs,
        train_dataset=train.remove_columns(text_cols),
        eval_dataset=valid.remove_columns(text_cols),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8),
        processing_class=tokenizer,
        callbacks=[curve],
        curve=curve,
    )
    train_result = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model(str(run_dir))  # the Trainer saves from the main process only
    trainer.save_state()
    _leave_process_group(targs)
    if not is_main:
        logger.info("process %d done; the main process evaluates and writes the run directory", targs.process_index)
        return run_dir
    metrics = dict(train_result.metrics)
    metrics["train_rows"] = len(train)
    metrics["processes"] = targs.world_size
    atomic.write_text(run_dir / "train_results.json", json.dumps(metrics, indent=2))
    logger.info("training done in %.0fs: %s", metrics.get("train_runtime", 0), metrics)
    _draw(run_dir, "learning curve", lambda: plots.learning_curve_plot(
        run_dir, curve_metrics({f: templates.family_info(f) for f in templates.families})))

    if not dargs.skip_test:
        from p5rec.eval.evaluation import FULL_RESULTS, EvalConfig, evaluate_run

        # FSDP and ZeRO-3 shard the weights over the processes: the main process alone cannot run the model in
        # memory, so it scores the saved one (configs/accelerate/; not run on this project's machines)
        sharded = getattr(trainer, "is_fsdp_enabled", False) or (
            getattr(trainer, "is_deepspeed_enabled", False)
            and getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3)
        if sharded:
            logger.info("weights sharded over %d processes: scoring the saved model", targs.world_size)
        evaluate_run(  # the run's own evaluation, as its flags cap it: results.json, whatever the caps
            run_dir,
            EvalConfig(
                max_cases=dargs.test_max_cases,
                max_candidate_cases=dargs.test_max_candidate_cases,
                batch_size=targs.per_device_eval_batch_size,
                max_source_length=dargs.max_source_length,
                seed=targs.seed,
                sasrec=dargs.sasrec_baseline,
            ),
            model=None if sharded else model,
            tokenizer=None if sharded else tokenizer,
            prepared=prepared,
            templates=templates,
            out=run_dir / FULL_RESULTS,
        )
    total = time.time() - started
    _update_json(run_dir / "run_config.json", {"wall_clock_seconds": round(total, 1)})
    modelcard.write_model_card(run_dir)
    logger.info("run directory: %s (%.0fs in all)", run_dir, total)
    return run_dir


def _draw(run_dir: Path, what: str, draw) -> None:
    """Make a plot; a failure to draw is a warning, never the loss of a finished run."""
    try:
        path = draw()
    except Exception as exc:  # noqa: BLE001 - matplotlib failures are many and none is worth the run
        logger.warning("could not draw the %s in %s: %s: %s", what, run_dir, type(exc).__name__, exc)
        return
    if path is not None:
        logger.info("wrote %s", path)


def _wait_for_everyone(targs) -> None:
    if targs.world_size > 1:
        targs.distributed_state.wait_for_everyone()


def _leave_process_group(targs) -> None:
    """After training's last collective: wait for every process; each then leaves through :func:`_exit_now`.

    Left to the interpreter, a process's exit tears the gloo group's threads down; now and then that aborts it
    ("terminate called without an active exception") and the launcher kills the main process mid-evaluation.
    ``destroy_process_group`` first does not settle it: it hangs now and then itself (pytorch#75097; seen here
    once in seven runs of the two-process test, the launch never returning after the run was written)."""
    _wait_for_everyone(targs)


def _exit_now(code: int) -> None:
    """End a process of a multi-process launch: logs and streams flushed, then ``os._exit``, which skips the
    interpreter's teardown of the process group (see :func:`_leave_process_group`). Every file of the run is
    written and closed by then (atomic writes)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _with_family_ids(ds, names: list[str]):
    """``ds`` with a ``family_ids`` column: each row's family as an index into ``names`` (-1: none of them)."""
    import numpy as np

    family = np.asarray(ds["family"])
    ids = np.full(len(family), -1, dtype=np.int64)
    for i, name in enumerate(names):
        ids[family == name] = i
    return ds.add_column("family_ids", ids.tolist())


def _grouping_keys(train, grouping: str):
    """What the batch sampler sorts each mega-batch by: the row's length, or its family and then its length."""
    import numpy as np

    from p5rec.prompts.mixture import row_lengths

    lengths = row_lengths(train)
    if grouping == "family":
        family = np.unique(np.asarray(train["family"]), return_inverse=True)[1]
        return family.astype(np.int64) * (int(lengths.max()) + 1) + lengths
    return lengths


def _template_weights(dargs: DataArguments, templates) -> dict[str, float]:
    """Sampling weights within each family: candidate-list templates at ``--candidate_template_weight``, then each
    template's own ``weight:`` (tasks/<family>/templates.yaml), then ``--template_weights``."""
    weights = {t.id: dargs.candidate_template_weight for t in templates if t.scoring == "candidate_ranking"}
    weights |= {t.id: t.weight for t in templates if t.weight is not None}
    given = dargs.template_weight_map()
    unknown = [t for t in given if t not in templates]
    if unknown:
        raise ValueError(f"--template_weights: unknown template ids {unknown} (see `p5rec templates list`)")
    return weights | given


def _render_counts(dargs: DataArguments, templates) -> dict[str, int]:
    """``--renders``, with each other family of ``--families`` at its spec's ``renders:``."""
    counts = dargs.render_counts()
    unknown = [f for f in dargs.family_list() if f not in templates.families]
    if unknown:
        raise ValueError(f"--families: unknown families {unknown}; known: {', '.join(templates.families)} "
                         "(a new family is a tasks/<family>/templates.yaml, or a file passed with --template_files)")
    for f in dargs.family_list():
        counts.setdefault(f, templates.family_info(f).renders)
    return counts


def _write_run_files(run_dir, margs, dargs, targs, prepared, render_config, spec, mix_info, model) -> None:
    import p5rec

    config = {
        "p5rec_version": p5rec.__version__,
        "seed": targs.seed,
        "model": asdict(margs),
        "data": asdict(dargs),
        "render": asdict(render_config),
        "mixture": asdict(spec) | mix_info,
        "training": targs.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prepared_dir": str(prepared.path),
    }
    atomic.write_text(run_dir / "run_config.json", json.dumps(config, indent=2, default=str))
    atomic.write_text(run_dir / "versions.json", json.dumps(_versions(), indent=2))
    atomic.copy_file(Path(prepared.path) / "manifest.json", run_dir / "manifest.json")
    atomic.copy_file(Path(prepared.path) / "index.json", run_dir / "index.json")


def _versions() -> dict:
    import datasets
    import torch
    import transformers

    import p5rec

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "p5rec": p5rec.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _update_json(path: Path, values: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    atomic.write_text(path, json.dumps(data, indent=2, default=str))


def _add_file_log(path: Path) -> None:
    """Log to the run's train_log.txt, and only to this run's: the handler of a run started earlier in the same
    process is closed first, so its file never receives another run's lines."""
    root = logging.getLogger()
    for earlier in [h for h in root.handlers if getattr(h, "p5rec_run_log", False)]:
        root.removeHandler(earlier)
        earlier.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.p5rec_run_log = True
    root.addHandler(handler)


def _cpu_processes() -> None:
    """Several processes on a machine without a GPU train data-parallel on the CPU (gloo).

    ``accelerate launch --multi_gpu --num_processes N`` (or ``--config_file configs/accelerate/cpu.yaml``, or
    torchrun) starts N processes with ``WORLD_SIZE``; without a GPU, accelerate would make each one a separate
    single-process run (all of them rank 0, all writing the run directory) unless told to use the CPU, which is
    done here. ``accelerate launch --cpu --num_processes N`` is another thing: accelerate 1.x starts one process
    for it unless ``--mpirun_hostfile`` is given, so that is said, not silently run as one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
            logger.info("%d processes and no GPU: data-parallel on the CPU (gloo)", world)
    elif (world == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
          and os.environ.get("MASTER_ADDR") and "LOCAL_RANK" not in os.environ):
        logger.warning("`accelerate launch --cpu --num_processes N` started one process: accelerate spreads CPU "
                       "processes only through mpirun (--mpirun_hostfile). For N processes on this machine: "
                       "accelerate launch --config_file configs/accelerate/cpu.yaml train.py ...")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    _cpu_processes()
    try:  # a flag that contradicts another: one line, not a traceback from the dataclasses' checks
        margs, dargs, targs = parse_args(argv)
        _check_flags(dargs, targs, margs)
    except ValueError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    from p5rec.run import RunError
    from p5rec.prompts.templates import TemplateError

    code = 0
    try:
        run(margs, dargs, targs)
    except (RunError, OutputDirError, FileNotFoundError) as exc:
        # a damaged checkpoint or run file, an --output_dir that must not be written, a path that is not there:
        # one line naming it, not a traceback
        print(f"train: {exc}", file=sys.stderr)
        code = 2
    except TemplateError as exc:  # a --template_files file (or its family header) that does not load
        more = f" (and {len(exc.problems) - 1} more; see `p5rec templates validate`)" if len(exc.problems) > 1 else ""
        print(f"train: {exc.problems[0]}{more}", file=sys.stderr)
        code = 2
    if targs.world_size > 1:  # one of several processes: leave without the process group's teardown
        _exit_now(code)
    return code


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one T5 on the task mixture (all flags of train.py; see `p5rec train -- --help`)"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="train.py arguments, or one JSON/YAML config file")
    p.set_defaults(func=lambda a: main(a.args))
