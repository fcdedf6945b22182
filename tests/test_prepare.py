"""prepare: tiny hand-written Amazon-2014 and P5-sequence inputs end to end; CLI error handling; MI if present."""

import gzip
import json
from pathlib import Path

import pytest

from p5rec.cli import main
from p5rec.data.prepare import FAMILY_DIRS, load_prepared, prepare

ROOT = Path(__file__).resolve().parents[1]
MI = ROOT / "data" / "reviews_Musical_Instruments_5.json.gz"

TEXTS = [
    "The strings sound great on my old guitar.",
    "The tuner is accurate and very easy to read.",
    "Cheap cable, the cable broke after a week of use.",
    "Solid stand, the stand holds my guitar well.",
]


def write_amazon(path: Path) -> Path:
    """7 users x 8 items; u7 has one review (k-core k=2 drops it); one exact duplicate line."""
    rows = []
    for u in range(6):
        for j in range(5):
            item = f"B{(u + j) % 8:03d}"
            rows.append({"reviewerID": f"U{u}", "asin": item, "overall": float(1 + (u + j) % 5),
                         "unixReviewTime": 1_000_000 + 1000 * j + u, "reviewText": TEXTS[(u + j) % 4],
                         "summary": f"summary {u} {j}", "reviewerName": f"name{u}"})
    rows.append(dict(rows[0]))  # exact duplicate
    rows.append({"reviewerID": "U7", "asin": "B000", "overall": 5.0, "unixReviewTime": 5, "reviewText": TEXTS[0],
                 "summary": "s", "reviewerName": "x"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_p5seq(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{u} " + " ".join(str(1 + (u + j) % 9) for j in range(5)) for u in range(1, 8)]
    (folder / "sequential_data.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def amazon(tmp_path_factory):
    base = tmp_path_factory.mktemp("amz")
    src = write_amazon(base / "reviews_Tiny_5.json.gz")
    out = prepare(src, base / "out", k=2, n_negatives=2, seed=3)
    return src, out


def test_prepare_amazon_counts_and_families(amazon):
    _, out = amazon
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["interactions_read"] == 32
    assert c["duplicates"] == {"exact_duplicates": 1, "repeat_interactions": 0}
    assert c["kcore_removed"]["rows"] == 1 and c["after"] == {"users": 6, "items": 8, "interactions": 30}
    assert set(m["families"]) == set(FAMILY_DIRS) and m["skipped"] == {}
    assert m["families"]["sequential"]["splits"] == {"train": 6 * 2, "valid": 6, "test": 6}
    assert m["families"]["direct"]["splits"] == {"train": 6 * 3, "valid": 6, "test": 6}
    assert sum(m["families"]["rating"]["splits"].values()) == 30
    assert m["explanation"]["coverage"] > 0.5
    assert m["index"]["strategy"] == "random" and m["seed"] == 3 and m["k"] == 2
    assert "timings" in m and len(m["fingerprint"]) == 64


def test_load_prepared(amazon):
    _, out = amazon
    ds = load_prepared(out)
    assert len(ds.interactions) == 30 and ds.catalogue == [f"B{i:03d}" for i in range(8)]
    assert ds.family("rating") is ds.family("review")
    seq = ds.family("sequential")
    ui = ds.user_items()
    for row in ds.family("direct")["test"]:
        assert len(row["candidates"]) == 3 and row["target"] in row["candidates"]
        assert not (set(row["candidates"]) - {row["target"]}) & ui[row["user"]]
    for row in seq["test"]:
        assert row["history"] + [row["target"]] == [
            r["item"] for r in ds.interactions if r["user"] == row["user"]]  # time-ordered table
    expl = ds.family("explanation")
    review_split = {(r["user"], r["item"]): s for s in ("train", "valid", "test") for r in ds.family("review")[s]}
    assert all(review_split[(r["user"], r["item"])] == s for s in expl for r in expl[s])
    counts = ds.train_item_counts()
    assert sum(counts.values()) == len(ds.family("direct")["train"])
    assert all(ds.index.item_text(i) for i in ds.catalogue)


def test_no_family_trains_on_a_pair_another_family_tests(amazon, tmp_path):
    """The default review split is the sequences' leave-one-out: each user's last review is the rating, review and
    explanation test case and the sequential and direct test target; no training table of any family holds a
    (user, item) pair that a valid or test table holds. P5's ratio split, kept as an option, does not."""
    src, out = amazon

    def pairs(ds, split):
        tables = {"sequential": ("user", "target"), "direct": ("user", "target"), "review": ("user", "item"),
                  "explanation": ("user", "item")}
        return {fam: set(zip(ds.family(fam)[split][u], ds.family(fam)[split][i])) for fam, (u, i) in tables.items()}

    def leaks(ds):
        trained = set().union(*pairs(ds, "train").values())
        return {fam: held & trained for split in ("valid", "test") for fam, held in pairs(ds, split).items()
                if held & trained}

    ds = load_prepared(out)
    assert ds.manifest["params"]["review_split"] == "leave-one-out"
    assert leaks(ds) == {}
    held = pairs(ds, "test")
    assert held["review"] == held["sequential"] and held["explanation"] <= held["sequential"]
    assert ds.manifest["families"]["rating"]["splits"] == {"train": 6 * 3, "valid": 6, "test": 6}
    ratio = load_prepared(prepare(src, tmp_path / "ratio", k=2, n_negatives=2, seed=3, review_split="ratio"))
    assert leaks(ratio)  # P5's split: the rating table trains on pairs the sequences test
    with pytest.raises(ValueError, match="unknown review split 'random'"):
        prepare(src, tmp_path / "bad", k=2, review_split="random")


def test_a_run_on_a_prepared_dir_records_the_split_it_was_prepared_with(amazon, tmp_path):
    from p5rec.train.training import DataArguments, prepare_data

    src, out = amazon
    ratio = prepare(src, tmp_path / "ratio", k=2, n_negatives=2, seed=3, review_split="ratio")
    for prepared_dir, split in ((out, "leave-one-out"), (ratio, "ratio")):
        dargs = DataArguments(prepared_dir=str(prepared_dir))  # --review_split left at its default
        assert prepare_data(dargs, seed=3).path == prepared_dir and dargs.review_split == split


def test_a_ratio_split_keeps_the_fingerprint_of_preparations_before_the_choice(amazon, tmp_path):
    from p5rec.data.prepare import fingerprint, review_split_of

    src, _ = amazon
    manifest = json.loads((prepare(src, tmp_path / "r", k=2, n_negatives=2, seed=3, review_split="ratio")
                           / "manifest.json").read_text())
    older = {**manifest, "params": {k: v for k, v in manifest["params"].items() if k != "review_split"}}
    assert fingerprint(older) == manifest["fingerprint"] and review_split_of(older) == "ratio"


def test_same_input_same_manifest(amazon, tmp_path):
    src, out = amazon
    again = prepare(src, tmp_path / "again", k=2, n_negatives=2, seed=3)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, again))
    a.pop("timings"), b.pop("timings")
    assert a == b
    other = prepare(src, tmp_path / "other", k=2, n_negatives=2, seed=4)
    assert json.loads((other / "manifest.json").read_text())["fingerprint"] != a["fingerprint"]


def test_p5seq_skips_families_without_data(tmp_path):
    out = prepare(write_p5seq(tmp_path / "seq"), tmp_path / "out", fmt="p5seq", k=2, n_negatives=2,
                  index="collaborative")
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["families"]) == {"sequential", "direct"}
    assert set(m["skipped"]) == {"rating", "review", "explanation"}
    assert "no ratings" in m["skipped"]["rating"] and "no review text" in m["skipped"]["review"]
    ds = load_prepared(out)
    assert ds.index.strategy == "collaborative"
    with pytest.raises(KeyError, match="no review text"):
        ds.family("review")


def test_cli_prepare_stats_and_errors(tmp_path, capsys):
    src = write_amazon(tmp_path / "reviews_Tiny_5.json.gz")
    assert main(["data", "prepare", "--path", str(src), "--out", str(tmp_path / "o"), "--k", "2",
                 "--n-negatives", "2", "--index", "sequential"]) == 0
    assert main(["data", "stats", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "6 users, 8 items, 30 interactions" in out and "explanation" in out
    assert "reviews      split by leave-one-out, as the sequences" in out
    assert main(["data", "prepare", "--path", str(src), "--out", str(tmp_path / "p5"), "--k", "2",
                 "--n-negatives", "2", "--review-split", "ratio"]) == 0
    assert main(["data", "stats", str(tmp_path / "p5")]) == 0
    assert "split 8:1:1 at random (P5's)" in capsys.readouterr().out
    assert main(["data", "prepare", "--path", str(tmp_path / "missing.json.gz"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json.gz" in err and "Traceback" not in err
    assert main(["data", "prepare", "--path", str(src), "--out", str(tmp_path / "y"), "--k", "50"]) == 2
    assert "k=50" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2


def write_recbole(folder: Path) -> Path:
    """RecBole's ml-100k atomic format (the header names and types of recbole/dataset_example/ml-100k): 7 users
    x 9 movies, the last movie rated once (k=2 drops it), plus a .user file p5rec does not read."""
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, 8):
        inter += [f"{u}\t{1 + (u + j) % 8}\t{1 + (u * j) % 5}\t{881250949 + 100 * j + u}" for j in range(5)]
    inter.append("1\t9\t5\t881250000")
    titles = ["Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat", "Twelve Monkeys", "Babe",
              "Dead Man Walking", "Richard III"]
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    item += [f"{i}\t{t}\t1995\tDrama Comedy" for i, t in enumerate(titles, start=1)]
    (folder / "ml-tiny.inter").write_text("\n".join(inter) + "\n")
    (folder / "ml-tiny.item").write_text("\n".join(item) + "\n")
    (folder / "ml-tiny.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                         "1\t24\tM\ttechnician\t85711\n")
    return folder


def test_cli_prepares_recbole_folder_or_inter_file(tmp_path, capsys):
    """One command moves a RecBole dataset to p5rec: counts before filtering in the manifest, titles in prompts."""
    folder = write_recbole(tmp_path / "ml-tiny")
    outs = []
    for i, path in enumerate([folder, folder / "ml-tiny.inter"]):
        outs.append(tmp_path / f"p{i}")
        assert main(["data", "prepare", "--path", str(path), "--format", "recbole", "--k", "2", "--n-negatives", "2",
                     "--out", str(outs[-1])]) == 0
    first, second = (json.loads((o / "manifest.json").read_text()) for o in outs)
    assert first["format"] == "recbole" and first["dataset"] == "ml-tiny" == second["dataset"]
    assert first["counts"]["before"] == {"users": 7, "items": 9, "interactions": 36}
    assert first["counts"]["after"]["items"] == 8 and first["counts"]["read"]["items"] == 9
    assert first["fingerprint"] == second["fingerprint"]  # the folder and its .inter file prepare the same
    capsys.readouterr()
    assert main(["data", "stats", str(outs[0])]) == 0
    assert "36 interactions, 0 malformed lines; 7 users, 9 items" in capsys.readouterr().out
    assert main(["templates", "preview", "2-T1", "--dataset", str(outs[0]), "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert sum(t in shown for t in ("Toy Story", "GoldenEye", "Four Rooms", "Get Shorty", "Copycat")) >= 2
    # the format is guessed from the .inter name; a bad header is one line naming file, line and field
    (folder / "ml-tiny.inter").write_text("user_id\titem_id:token\n1\t2\n")
    assert main(["data", "prepare", "--path", str(folder), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ml-tiny.inter line 1, field 1: 'user_id' is not name:type" in err
    assert not (tmp_path / "bad").exists()


def test_cli_delimiter_flag(tmp_path, capsys):
    path = tmp_path / "log.dat"
    path.write_text("user|item|rating\n" + "".join(f"u{u}|i{(u + j) % 6}|{1 + j % 5}\n" for u in range(5)
                                                     for j in range(4)))
    assert main(["data", "prepare", "--path", str(path), "--format", "csv", "--delimiter", "|", "--k", "2",
                 "--n-negatives", "2", "--out", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["counts"]["before"]["interactions"] == 20 and manifest["params"]["delimiter"] == "|"
    from p5rec.data.prepare import _parse_delimiter

    assert _parse_delimiter("\\t") == "\t" == _parse_delimiter("tab")  # `--delimiter '\t'` as typed in a shell
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--path", str(path), "--delimiter", "||"])
    assert "expected one character" in capsys.readouterr().err


@pytest.mark.skipif(not MI.exists(), reason="embedded Musical Instruments file not present")
def test_musical_instruments_end_to_end(tmp_path):
    out = prepare(MI, tmp_path / "mi")
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["after"] == {"users": 1429, "items": 900, "interactions": 10261}
    assert m["counts"]["kcore_removed"]["rows"] == 0
    assert set(m["families"]) == set(FAMILY_DIRS)
    assert m["families"]["sequential"]["splits"]["test"] == 1429
    assert m["source"][0]["sha256"] == "03f9cc27ae13a454cb4ea6cb620fb10546cc1194ef921441d1c5f34addff2748"


# --- Output directories are never deleted or mixed -------------------------------------------------------------------


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes: what must stay exactly as it was."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_refuses_what_it_did_not_write(amazon, tmp_path, capsys):
    src, prepared = amazon
    thesis = tmp_path / "thesis"  # a manifest.json of one's own, beside other work
    thesis.mkdir()
    (thesis / "manifest.json").write_text('{"title": "my thesis"}')
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    run = tmp_path / "run"  # a run directory holds a copy of the prepared manifest, beside its model
    run.mkdir()
    (run / "manifest.json").write_bytes((prepared / "manifest.json").read_bytes())
    (run / "model.safetensors").write_bytes(b"weights")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for target in (thesis, run, a_file):
        before = tree(tmp_path)
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="choose another --out"):
                prepare(src, target, k=2, n_negatives=2, overwrite=overwrite)
        assert tree(tmp_path) == before, target
    assert main(["data", "prepare", "--path", str(src), "--out", str(thesis), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "thesis.tex" in err and "not a dataset prepared by p5rec" in err
    assert (thesis / "thesis.tex").read_text() == "\\documentclass{article}"
    empty = tmp_path / "empty"  # an empty directory is free
    empty.mkdir()
    assert load_prepared(prepare(src, empty, k=2, n_negatives=2)).manifest["kind"] == "p5rec-prepared"


def test_prepare_replaces_its_own_output_only_with_overwrite(amazon, tmp_path, capsys):
    src, _ = amazon
    out = prepare(src, tmp_path / "out", k=2, n_negatives=2, seed=3)
    first = tree(out)
    with pytest.raises(FileExistsError, match="already holds a prepared dataset .*pass --overwrite"):
        prepare(src, out, k=2, n_negatives=2, seed=4)
    assert main(["data", "prepare", "--path", str(src), "--out", str(out), "--k", "2", "--seed", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tree(out) == first
    prepare(src, out, k=2, n_negatives=2, seed=4, overwrite=True)
    replaced = load_prepared(out).manifest
    assert replaced["params"]["seed"] == 4 and tree(out) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old sibling left


def test_older_outputs_are_recognised_and_keep_their_fingerprint(amazon, tmp_path):
    """Outputs written before the "kind" marker are still p5rec's own, and the marker is not part of the
    fingerprint, so runs trained on older preparations still match them."""
    from p5rec.data.prepare import fingerprint, is_prepared_output

    src, _ = amazon
    out = prepare(src, tmp_path / "out", k=2, n_negatives=2, seed=3)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["kind"]
    assert fingerprint(manifest) == manifest["fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert is_prepared_output(out)
    (out / "notes.txt").write_text("mine")
    assert not is_prepared_output(out)
    (out / "notes.txt").unlink()
    prepare(src, out, k=2, n_negatives=2, seed=3, overwrite=True)
    assert load_prepared(out).manifest["fingerprint"] == manifest["fingerprint"]
