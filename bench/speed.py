"""Speed benchmark: training throughput per preset, decoding users/s per method, tokenization cache hit vs miss.

    python bench/speed.py --out bench/results/speed-cpu.json            # all parts, CPU
    python bench/speed.py --parts train --presets mini,compact --steps 30

Everything runs in one process, one part after another, so the ratios between rows are meaningful even on a
shared, noisy machine (absolute numbers are not). Uses the embedded MI dataset and the real mixture.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

logger = logging.getLogger("bench.speed")


def _prepared(cache: Path):
    from p5rec.data.prepare import load_prepared, prepare

    out = cache / "prepared-mi"
    if not (out / "manifest.json").exists():
        prepare("amazon2014-musical-instruments", out)
    return load_prepared(out)


def bench_mixture(prepared, cache: Path) -> dict:
    """Render + tokenizer + tokenize once (miss), then load the cached mixture (hit)."""
    from p5rec.prompts.mixture import MixtureSpec, build_mixture
    from p5rec.prompts.templates import RenderConfig, load_templates

    templates = load_templates()
    rc = RenderConfig(renders={"sequential": 6, "direct": 3})
    spec = MixtureSpec()
    mix_cache = cache / "mixture"
    shutil.rmtree(mix_cache, ignore_errors=True)
    t0 = time.perf_counter()
    tok, train, _, info = build_mixture(prepared, templates, rc, spec, mix_cache)
    miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, train2, _, info2 = build_mixture(prepared, templates, rc, spec, mix_cache)
    hit = time.perf_counter() - t0
    assert not info["cache_hit"] and info2["cache_hit"] and len(train) == len(train2)
    return {"rows": len(train), "miss_s": round(miss, 2), "hit_s": round(hit, 2), "miss_over_hit": round(miss / hit, 1),
            "tokenizer": tok, "train": train}


def bench_train(tok, train, presets: list[str], steps: int, batch: int) -> list[dict]:
    """Optimizer steps on real mixture batches (AdamW, fp32), examples/s per preset."""
    from transformers import DataCollatorForSeq2Seq

    from p5rec.train.model import build_model

    rows = []
    ds = train.shuffle(seed=0).select(range(steps * batch)).remove_columns(
        [c for c in train.column_names if c not in ("input_ids", "attention_mask", "labels")])
    for preset in presets:
        torch.manual_seed(0)
        model = build_model(preset, tok)
        coll = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = [coll([ds[i] for i in range(s * batch, (s + 1) * batch)]) for s in range(steps)]
        model.train()
        for b in batches[:2]:  # warm-up
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        t0 = time.perf_counter()
        for b in batches[2:]:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        secs = time.perf_counter() - t0
        n = (steps - 2) * batch
        rows.append({"preset": preset, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                     "examples_per_s": round(n / secs, 1), "batch": batch})
        logger.info("train %s: %s", preset, rows[-1])
    return rows


def bench_decode(prepared, tok, preset: str, users: int, batch: int) -> list[dict]:
    """Users/s on the same (untrained) model and prompts: the cost of each decoding method, not its quality."""
    from p5rec.eval.decoding import ItemTrie, choice_logprobs, rank_items
    from p5rec.train.model import build_model
    from p5rec.prompts.templates import RenderConfig, load_templates, render_records

    torch.manual_seed(0)
    model = build_model(preset, tok).eval()
    templates = load_templates()
    rc = RenderConfig()
    rows = prepared.family("sequential")["test"].select(range(users)).to_list()
    direct = dict(zip(*[prepared.family("direct")["test"][c] for c in ("user", "candidates")]))
    src = [s for s, _ in render_records(templates.get("2-1"), rows, prepared.index, rc)]
    trie = ItemTrie.from_surfaces(tok, {r: prepared.index.item_text(r, "token") for r in prepared.index.items})
    out = []

    def timed(name, fn, n_prompts):
        t0 = time.perf_counter()
        fn()
        secs = time.perf_counter() - t0
        out.append({"method": name, "users_per_s": round(users / secs, 1), "prompts": n_prompts})
        logger.info("decode %s: %s", name, out[-1])

    timed("restricted top-20, one decoder step (single-token ids)",
          lambda: rank_items(model, tok, src, trie, k=20, batch_size=batch), users)
    timed("restricted beam search, 20 beams (generate + trie mask)",
          lambda: _force_beam(model, tok, src, trie, batch), users)
    timed("restricted beam search, 20 beams (p5rec's trie_beam_search)",
          lambda: _trie_beam(model, tok, src, trie, batch), users)

    def unrestricted():
        for i in range(0, len(src), batch):
            enc = tok(src[i : i + batch], return_tensors="pt", padding=True)
            model.generate(**enc, num_beams=20, num_return_sequences=20, max_new_tokens=2, do_sample=False)

    timed("unrestricted beam search, 20 beams", unrestricted, users)
    cand_src = [s for s, _ in render_records(templates.get("2-7"), [dict(r, candidates=direct[r["user"]]) for r in rows],
                                            prepared.index, rc)]
    per = [trie.subset(direct[r["user"]]) for r in rows]
    timed("100 candidates in one prompt (2-7), one masked step",
          lambda: rank_items(model, tok, cand_src, per, k=100, batch_size=batch), users)
    yn = [dict(r, item=c) for r in rows[: max(1, users // 10)] for c in direct[r["user"]]]
    yn_src = [s for s, _ in render_records(templates.get("2-11"), yn, prepared.index, rc)]
    t0 = time.perf_counter()
    choice_logprobs(model, tok, yn_src, ["yes", "no"], batch_size=batch * 2)
    secs = time.perf_counter() - t0
    out.append({"method": "yes/no per candidate (2-11), 100 prompts per user",
                "users_per_s": round(len(yn_src) / 100 / secs, 1), "prompts": len(yn_src)})
    return out


class TrieLogitsProcessor(LogitsProcessor):
    """generate()'s side of a trie mask (what p5rec used before ``trie_beam_search``), kept as the baseline it is
    timed against. Masks every next token that would leave the trie; ``tries[i]`` serves example i (beams
    i*B..i*B+B-1)."""

    def __init__(self, tries: list, num_beams: int, pad_id: int):
        self.tries, self.num_beams, self.pad_id = tries, num_beams, pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        prefixes = input_ids[:, 1:].tolist()  # drop the decoder start token
        for row, prefix in enumerate(prefixes):
            trie = self.tries[row // self.num_beams]
            allowed = trie.allowed(tuple(prefix))
            if not allowed:  # a finished beam keeps padding; generate() ignores it
                allowed = [self.pad_id]
            mask[row, allowed] = 0.0
        return scores + mask


def _trie_beam(model, tok, src, trie, batch):
    """p5rec's own trie beam search (what evaluation uses for multi-token ids), forced on single-token ids."""
    from p5rec.eval.decoding import trie_beam_search

    for i in range(0, len(src), batch):
        enc = tok(src[i : i + batch], return_tensors="pt", padding=True)
        trie_beam_search(model, enc, [trie] * enc["input_ids"].shape[0], 20)


def _force_beam(model, tok, src, trie, batch):
    """Beam search through generate() with the trie mask even though ids are single tokens."""
    from transformers import LogitsProcessorList

    for i in range(0, len(src), batch):
        enc = tok(src[i : i + batch], return_tensors="pt", padding=True)
        n = enc["input_ids"].shape[0]
        model.generate(**enc, num_beams=20, num_return_sequences=20, max_new_tokens=2, do_sample=False,
                       logits_processor=LogitsProcessorList([TrieLogitsProcessor([trie] * n, 20, tok.pad_token_id)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="mixture,train,decode")
    ap.add_argument("--presets", default="tiny,mini,compact,small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--decode-preset", default="mini")
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    cache = Path(tempfile.mkdtemp(prefix="p5rec-bench-"))
    report = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    prepared = _prepared(cache)
    mix = bench_mixture(prepared, cache)
    tok, train = mix.pop("tokenizer"), mix.pop("train")
    if "mixture" in parts:
        report["mixture_cache"] = mix
        logger.info("mixture: %s", mix)
    if "train" in parts:
        report["train"] = bench_train(tok, train, args.presets.split(","), args.steps, args.batch)
    if "decode" in parts:
        report["decode"] = bench_decode(prepared, tok, args.decode_preset, args.users, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
