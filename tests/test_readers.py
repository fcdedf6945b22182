"""Readers on tiny hand-written files (one test per format), error reporting, and the two real files' counts."""

from __future__ import annotations

import calendar
import gzip
import json
import math
import os
import time
from pathlib import Path

import pytest

from p5rec.data import readers
from p5rec.data.readers import INTERACTION_FEATURES, ITEM_FEATURES, DataFormatError, detect_format, read
from p5rec.registry import Registry

REPO = Path(__file__).resolve().parent.parent
MI_FILE = REPO / "data" / "reviews_Musical_Instruments_5.json.gz"
# P5's Beauty sequences where the registry's p5-beauty entry has the user put them ($P5REC_DATA/p5-beauty/)
P5_BEAUTY = Path(os.environ["P5REC_DATA"]) / "p5-beauty" if os.environ.get("P5REC_DATA") else None


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    """Write lines (newline-terminated) to ``path``, gzip-compressed when the name ends in .gz."""
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding=encoding) as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding=encoding)
    return path


def utc(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def rows(result: readers.ReadResult) -> list[dict]:
    return result.interactions.to_list()


def assert_canonical(result: readers.ReadResult) -> None:
    assert result.interactions.features == INTERACTION_FEATURES
    assert list(result.interactions.column_names) == list(readers.INTERACTION_COLUMNS)
    if result.items is not None:
        assert result.items.features == ITEM_FEATURES


# --- Amazon 2014 -------------------------------------------------------------------------------------------------

AMAZON2014_REVIEWS = [
    json.dumps({"reviewerID": "U1", "asin": "A1", "reviewerName": "Ann", "helpful": [0, 0], "reviewText": "Great.",
                "overall": 5.0, "summary": "good", "unixReviewTime": 1393545600, "reviewTime": "02 28, 2014"}),
    json.dumps({"reviewerID": "U2", "asin": "A1", "helpful": [1, 2], "reviewText": "Meh, café.",
                "overall": 3.0, "summary": "ok", "unixReviewTime": 1363392000}),
    "",
    json.dumps({"reviewerID": "U1", "asin": "A2", "reviewerName": "Ann", "overall": 4, "summary": "fine",
                "unixReviewTime": 1400000000}),
]
AMAZON2014_META = [
    "{'asin': 'A1', 'title': \"Pop filter 'pro'\", 'brand': 'Nady', "
    "'categories': [['Musical Instruments', 'Microphones'], ['Musical Instruments', 'Accessories']], "
    "'salesRank': {'Musical Instruments': 5}}",
    # Some lines are plain JSON (true/null are not Python literals).
    '{"asin": "A2", "title": "Cable", "related": null, "imUrl": "x", "categories": [["Cables"]]}',
]


def test_amazon2014_reviews_and_python_literal_metadata(tmp_path):
    write_lines(tmp_path / "reviews_Test_5.json.gz", AMAZON2014_REVIEWS)
    write_lines(tmp_path / "meta_Test.json.gz", AMAZON2014_META)
    result = read("amazon2014", tmp_path)
    assert_canonical(result)
    assert rows(result) == [
        {"user": "U1", "item": "A1", "rating": 5.0, "timestamp": 1393545600, "review": "Great.", "summary": "good",
         "user_name": "Ann"},
        {"user": "U2", "item": "A1", "rating": 3.0, "timestamp": 1363392000, "review": "Meh, café.", "summary": "ok",
         "user_name": ""},
        {"user": "U1", "item": "A2", "rating": 4.0, "timestamp": 1400000000, "review": "", "summary": "fine",
         "user_name": "Ann"},
    ]
    assert result.items.to_list() == [
        {"item": "A1", "title": "Pop filter 'pro'", "brand": "Nady",
         "categories": ["Musical Instruments", "Microphones", "Accessories"]},
        {"item": "A2", "title": "Cable", "brand": "", "categories": ["Cables"]},
    ]
    assert result.counts["read"] == 3 and result.counts["malformed"] == 0
    assert result.counts["interactions"] == 3 and result.counts["items"] == 2
    assert [Path(s).name for s in result.source] == ["reviews_Test_5.json.gz", "meta_Test.json.gz"]


def test_amazon2014_explicit_file_without_metadata(tmp_path):
    path = write_lines(tmp_path / "reviews_Test_5.json", AMAZON2014_REVIEWS)
    result = read("amazon2014", [path])
    assert result.items is None
    assert result.interactions["item"] == ["A1", "A1", "A2"]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"reviewerID": "U3", "asin": ', "not valid JSON"),
        (json.dumps({"reviewerID": "U3", "overall": 1.0}), "missing field 'asin'"),
        (json.dumps({"reviewerID": "U3", "asin": "A9"}), "missing field 'overall'"),
        (json.dumps({"reviewerID": "U3", "asin": "A9", "overall": "five"}), "field 'overall' is not a number"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "reviews_X.json.gz", AMAZON2014_REVIEWS[:2] + [bad_line] + AMAZON2014_REVIEWS[3:])
    with pytest.raises(DataFormatError) as info:
        read("amazon2014", path)
    message = str(info.value)
    assert "reviews_X.json.gz line 3: " in message and expected in message
    assert info.value.line == 3


def test_skip_counts_malformed_lines(tmp_path, caplog):
    lines = AMAZON2014_REVIEWS + ["not json", json.dumps({"reviewerID": "U9", "overall": 2.0}), "{}"]
    path = write_lines(tmp_path / "reviews_X.json.gz", lines)
    with caplog.at_level("WARNING", logger="p5rec.data.readers"):
        result = read("amazon2014", path, on_error="skip")
    assert result.counts["read"] == 6
    assert result.counts["malformed"] == 3
    assert len(result.interactions) == 3
    assert "skipped 3 malformed" in caplog.text and "reviews_X.json.gz line 5" in caplog.text


def test_missing_file_and_empty_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="reviews_Nope.json.gz"):
        read("amazon2014", tmp_path / "reviews_Nope.json.gz")
    with pytest.raises(FileNotFoundError, match="reviews_"):
        read("amazon2014", tmp_path)  # a directory without a reviews file
    empty = write_lines(tmp_path / "reviews_Empty.json", ["", "not json"])
    with pytest.raises(DataFormatError, match="held no interactions"):
        read("amazon2014", empty, on_error="skip")


def test_bad_arguments(tmp_path):
    path = write_lines(tmp_path / "reviews_X.json", AMAZON2014_REVIEWS)
    with pytest.raises(KeyError, match="known: .*amazon2014"):
        read("amazon1999", path)
    with pytest.raises(ValueError, match="on_error"):
        read("amazon2014", path, on_error="ignore")
    with pytest.raises(ValueError, match="generic formats"):
        read("amazon2014", path, columns={"user": "reviewerID"})


# --- Amazon 2018 / 2023 --------------------------------------------------------------------------------------------


def test_amazon2018(tmp_path):
    write_lines(tmp_path / "Musical_Instruments_5.json", [
        json.dumps({"overall": 5.0, "vote": "2", "verified": True, "reviewTime": "11 3, 2014", "reviewerID": "U1",
                    "asin": "B1", "style": {"Color:": " Black"}, "reviewerName": "Bo", "reviewText": "Nice",
                    "summary": "Five Stars", "unixReviewTime": 1414972800, "image": ["http://x"]}),
        json.dumps({"overall": 2.0, "reviewerID": "U2", "asin": "B2", "unixReviewTime": 1414972801}),
    ])
    write_lines(tmp_path / "meta_Musical_Instruments.json", [
        json.dumps({"asin": "B1", "title": "Strings", "brand": "Ernie Ball", "category": ["Musical Instruments",
                                                                                        "Strings"]}),
        json.dumps({"asin": "B2", "category": []}),
    ])
    result = read("amazon2018", tmp_path)
    assert_canonical(result)
    assert rows(result) == [
        {"user": "U1", "item": "B1", "rating": 5.0, "timestamp": 1414972800, "review": "Nice",
         "summary": "Five Stars", "user_name": "Bo"},
        {"user": "U2", "item": "B2", "rating": 2.0, "timestamp": 1414972801, "review": "", "summary": "",
         "user_name": ""},
    ]
    assert result.items.to_list() == [
        {"item": "B1", "title": "Strings", "brand": "Ernie Ball", "categories": ["Musical Instruments", "Strings"]},
        {"item": "B2", "title": "", "brand": "", "categories": []},
    ]


def test_amazon2023(tmp_path):
    reviews = write_lines(tmp_path / "All_Beauty.jsonl.gz", [
        json.dumps({"rating": 5.0, "title": "Love it", "text": "Smells great", "images": [], "asin": "C1x",
                    "parent_asin": "C1", "user_id": "U1", "timestamp": 1588687728923, "helpful_vote": 0,
                    "verified_purchase": True}),
        json.dumps({"rating": 1, "title": "No", "text": "", "asin": "C2", "user_id": "U2",
                    "timestamp": 1588687729000}),
        json.dumps({"rating": 3, "user_id": "U3", "timestamp": 1}),
    ])
    meta = write_lines(tmp_path / "meta_All_Beauty.jsonl.gz", [
        json.dumps({"main_category": "All Beauty", "title": "Soap", "store": "Acme", "categories": ["Bath"],
                    "parent_asin": "C1"}),
    ])
    with pytest.raises(DataFormatError, match=r"All_Beauty.jsonl.gz line 3: missing field 'parent_asin'"):
        read("amazon2023", [reviews, meta])
    result = read("amazon2023", [reviews, meta], on_error="skip")
    assert_canonical(result)
    assert rows(result) == [
        {"user": "U1", "item": "C1", "rating": 5.0, "timestamp": 1588687728, "review": "Smells great",
         "summary": "Love it", "user_name": ""},
        {"user": "U2", "item": "C2", "rating": 1.0, "timestamp": 1588687729, "review": "", "summary": "No",
         "user_name": ""},
    ]
    assert result.items.to_list() == [{"item": "C1", "title": "Soap", "brand": "Acme", "categories": ["Bath"]}]
    assert result.counts["malformed"] == 1 and result.counts["meta_read"] == 1


# --- MovieLens ---------------------------------------------------------------------------------------------------


def test_movielens100k(tmp_path):
    write_lines(tmp_path / "u.data", ["196\t242\t3\t881250949", "186\t302\t3\t891717742", "22\t242\t1\t878887116"])
    flags_toy = ["0", "0", "0", "1", "1", "1"] + ["0"] * 13
    flags_unknown = ["1"] + ["0"] * 18
    (tmp_path / "u.item").write_bytes("\n".join([
        "|".join(["242", "Kolya (1996)", "24-Jan-1997", "", "http://x"] + flags_toy),
        "|".join(["302", "Café (1997)", "01-Jan-1997", "", "http://y"] + flags_unknown),
    ]).encode("latin-1") + b"\n")
    result = read("movielens100k", tmp_path)
    assert_canonical(result)
    assert rows(result)[0] == {"user": "196", "item": "242", "rating": 3.0, "timestamp": 881250949, "review": "",
                               "summary": "", "user_name": ""}
    assert result.interactions["user"] == ["196", "186", "22"]
    assert result.items.to_list() == [
        {"item": "242", "title": "Kolya (1996)", "brand": "", "categories": ["Animation", "Children's", "Comedy"]},
        {"item": "302", "title": "Café (1997)", "brand": "", "categories": ["unknown"]},
    ]
    # u.genre, when present, names the flag columns.
    write_lines(tmp_path / "u.genre", [f"G{i}|{i}" for i in range(19)] + [""])
    assert read("movielens100k", tmp_path).items["categories"][0] == ["G3", "G4", "G5"]
    write_lines(tmp_path / "u.data", ["196\t242\t3\t881250949", "186 302 3 891717742"])
    with pytest.raises(DataFormatError, match=r"u.data line 2: expected 4 '\\t'-separated fields"):
        read("movielens100k", tmp_path / "u.data")


def test_movielens1m(tmp_path):
    write_lines(tmp_path / "ratings.dat", ["1::1193::5::978300760", "1::661::3::978302109", "2::1193::x::978300760"])
    (tmp_path / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::"
        "Animation|Children's|Musical\n".encode("latin-1"))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n")
    with pytest.raises(DataFormatError, match=r"ratings.dat line 3: field 'rating' is not a number: 'x'"):
        read("movielens1m", tmp_path)
    result = read("movielens1m", tmp_path, on_error="skip")
    assert_canonical(result)
    assert rows(result) == [
        {"user": "1", "item": "1193", "rating": 5.0, "timestamp": 978300760, "review": "", "summary": "",
         "user_name": ""},
        {"user": "1", "item": "661", "rating": 3.0, "timestamp": 978302109, "review": "", "summary": "",
         "user_name": ""},
    ]
    assert result.items["categories"] == [["Drama"], ["Animation", "Children's", "Musical"]]
    assert result.counts == {"read": 3, "malformed": 1, "interactions": 2, "meta_read": 2, "items": 2}


def test_movielens_latest(tmp_path):
    write_lines(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp", "1,1,4.0,964982703",
                                           "1,3,4.5,964981247", "2,3,,964981247"])
    write_lines(tmp_path / "movies.csv", ["movieId,title,genres", "1,Toy Story (1995),Adventure|Animation",
                                          '3,"Grumpier Old Men, The (1995)",(no genres listed)'])
    with pytest.raises(DataFormatError, match=r"ratings.csv line 4: missing field 'rating'"):
        read("movielens-latest", tmp_path)
    result = read("movielens-latest", tmp_path, on_error="skip")
    assert_canonical(result)
    assert result.interactions["rating"] == [4.0, 4.5]
    assert result.interactions["timestamp"] == [964982703, 964981247]
    assert result.items.to_list() == [
        {"item": "1", "title": "Toy Story (1995)", "brand": "", "categories": ["Adventure", "Animation"]},
        {"item": "3", "title": "Grumpier Old Men, The (1995)", "brand": "", "categories": []},
    ]
    assert result.counts["read"] == 3  # data rows, not the header


# --- Yelp --------------------------------------------------------------------------------------------------------


def test_yelp(tmp_path):
    write_lines(tmp_path / "yelp_academic_dataset_review.json", [
        json.dumps({"review_id": "r1", "user_id": "Y1", "business_id": "B1", "stars": 4.0, "useful": 0,
                    "text": "Tasty", "date": "2016-03-09 00:00:00"}),
        json.dumps({"review_id": "r2", "user_id": "Y2", "business_id": "B1", "stars": 2, "text": "Slow",
                    "date": "2019-12-31 23:59:59"}),
    ])
    write_lines(tmp_path / "yelp_academic_dataset_business.json", [
        json.dumps({"business_id": "B1", "name": "Noodle Bar", "categories": "Restaurants, Noodles"}),
        json.dumps({"business_id": "B2", "name": "Closed", "categories": None}),
    ])
    result = read("yelp", tmp_path)
    assert_canonical(result)
    assert rows(result) == [
        {"user": "Y1", "item": "B1", "rating": 4.0, "timestamp": utc("2016-03-09 00:00:00"), "review": "Tasty",
         "summary": "", "user_name": ""},
        {"user": "Y2", "item": "B1", "rating": 2.0, "timestamp": utc("2019-12-31 23:59:59"), "review": "Slow",
         "summary": "", "user_name": ""},
    ]
    assert result.items.to_list() == [
        {"item": "B1", "title": "Noodle Bar", "brand": "", "categories": ["Restaurants", "Noodles"]},
        {"item": "B2", "title": "Closed", "brand": "", "categories": []},
    ]
    write_lines(tmp_path / "review.json", [json.dumps({"user_id": "Y1", "business_id": "B1", "stars": 1,
                                                       "date": "yesterday"})])
    with pytest.raises(DataFormatError, match=r"review.json line 1: field 'date' is neither a number nor an ISO"):
        read("yelp", tmp_path / "review.json")


# --- P5 sequences ------------------------------------------------------------------------------------------------


def test_p5seq_with_and_without_datamaps(tmp_path):
    write_lines(tmp_path / "sequential_data.txt", ["1 1 2 3", "2 4 2"])
    result = read("p5seq", tmp_path)
    assert_canonical(result)
    assert result.interactions["user"] == ["1", "1", "1", "2", "2"]
    assert result.interactions["item"] == ["1", "2", "3", "4", "2"]
    assert result.interactions["timestamp"] == [0, 1, 2, 0, 1]
    assert all(math.isnan(r) for r in result.interactions["rating"])
    (tmp_path / "datamaps.json").write_text(json.dumps({
        "user2id": {}, "id2user": {"1": "AUSER1", "2": "AUSER2"},
        "id2item": {"1": "ASIN1", "2": "ASIN2", "3": "ASIN3", "4": "ASIN4"},
    }))
    result = read("p5seq", tmp_path)
    assert result.interactions["user"][:4] == ["AUSER1", "AUSER1", "AUSER1", "AUSER2"]
    assert result.interactions["item"] == ["ASIN1", "ASIN2", "ASIN3", "ASIN4", "ASIN2"]
    assert result.counts["read"] == 2 and result.counts["interactions"] == 5
    assert result.source == [str(tmp_path / "datamaps.json"), str(tmp_path / "sequential_data.txt")]
    write_lines(tmp_path / "sequential_data.txt", ["1 1 2 3", "2 4 9", "3"])
    with pytest.raises(DataFormatError, match=r"sequential_data.txt line 2: item id '9' is not in datamaps"):
        read("p5seq", tmp_path)
    result = read("p5seq", tmp_path, on_error="skip")
    assert result.counts["malformed"] == 2 and len(result.interactions) == 3


# --- Generic tables ----------------------------------------------------------------------------------------------

MAPPING = {"user": "uid", "item": "iid", "rating": "score", "timestamp": "ts", "review": "body"}


def test_csv_with_mapping_and_iso_timestamps(tmp_path):
    path = write_lines(tmp_path / "log.csv", [
        "uid,iid,score,ts,body,extra",
        "u1,i1,4.5,2014-02-28,hello,x",
        'u1,i2,,2014-02-28T10:00:00Z,"a, b",y',
        "u2,i1,3,1393545600,,z",
    ])
    result = read("csv", path, columns=MAPPING)
    assert_canonical(result)
    assert rows(result)[0] == {"user": "u1", "item": "i1", "rating": 4.5, "timestamp": utc("2014-02-28 00:00:00"),
                               "review": "hello", "summary": "", "user_name": ""}
    assert result.interactions["timestamp"][1:] == [utc("2014-02-28 10:00:00"), 1393545600]
    assert math.isnan(result.interactions["rating"][1])
    assert result.interactions["review"][1] == "a, b"

    with pytest.raises(DataFormatError) as info:
        read("csv", path, columns={"user": "uid", "item": "item_id"})
    assert "'item_id'" in str(info.value) and "available columns: uid, iid, score, ts, body, extra" in str(info.value)
    with pytest.raises(ValueError, match="must map 'item'"):
        read("csv", path, columns={"user": "uid"})

    write_lines(path, ["uid,iid,score,ts,body,extra", "u1,i1,4.5,yesterday,hello,x", "u1,i3,1,0,,"])
    with pytest.raises(DataFormatError, match=r"log.csv line 2: field 'ts' is neither a number nor an ISO date"):
        read("csv", path, columns=MAPPING)
    skipped = read("csv", path, columns=MAPPING, on_error="skip")
    assert skipped.counts == {"read": 2, "malformed": 1, "interactions": 1}


def test_csv_canonical_names_without_mapping(tmp_path):
    path = write_lines(tmp_path / "t.tsv", ["user\titem\trating", "a\tx\t1", "b\ty\t2"])
    result = read("csv", path)
    assert result.interactions["rating"] == [1.0, 2.0]
    assert result.interactions["timestamp"] == [0, 0]
    write_lines(path, ["user\titem", "a\tx", "b"])
    with pytest.raises(DataFormatError, match=r"t.tsv line 3: expected 2 fields"):
        read("csv", path)


def test_jsonl_with_mapping(tmp_path):
    path = write_lines(tmp_path / "log.jsonl", [
        json.dumps({"uid": 1, "iid": 10, "score": 5, "ts": 1393545600, "body": "yes"}),
        json.dumps({"uid": 2, "iid": 10.0, "ts": "2014-02-28"}),
        json.dumps({"iid": 11, "score": 1}),
    ])
    with pytest.raises(DataFormatError, match=r"log.jsonl line 3: missing field 'uid' \(for 'user'\)"):
        read("jsonl", path, columns=MAPPING)
    result = read("jsonl", path, columns=MAPPING, on_error="skip")
    assert_canonical(result)
    assert result.interactions["user"] == ["1", "2"]
    assert result.interactions["item"] == ["10", "10"]
    assert result.interactions["timestamp"] == [1393545600, utc("2014-02-28 00:00:00")]
    assert result.interactions["review"] == ["yes", ""]
    with pytest.raises(DataFormatError, match="'headline' \\(for 'summary'\\) not found in any line"):
        read("jsonl", path, columns={**MAPPING, "summary": "headline"}, on_error="skip")


def test_parquet_with_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"uid": ["u1", "u2", None], "iid": [1, 2, 3], "score": [1.0, None, 2.0],
                             "ts": pa.array([0, 86_400_000_000, 0], type=pa.timestamp("us"))}), path)
    columns = {"user": "uid", "item": "iid", "rating": "score", "timestamp": "ts"}
    with pytest.raises(DataFormatError, match=r"log.parquet row 3: missing field 'uid'"):
        read("parquet", path, columns=columns)
    result = read("parquet", tmp_path, columns=columns, on_error="skip")
    assert_canonical(result)
    assert result.interactions["item"] == ["1", "2"]
    assert result.interactions["timestamp"] == [0, 86_400]
    with pytest.raises(DataFormatError, match="'stars' \\(for 'rating'\\) not found; available columns: uid, iid"):
        read("parquet", path, columns={**columns, "rating": "stars"})


# --- Format detection and the registry -----------------------------------------------------------------------


def test_detect_format(tmp_path):
    assert detect_format(tmp_path / "reviews_Beauty_5.json.gz") == "amazon2014"
    assert detect_format(tmp_path / "u.data") == "movielens100k"
    assert detect_format(tmp_path / "ml-1m" / "ratings.dat") == "movielens1m"
    assert detect_format(tmp_path / "ratings.csv") == "movielens-latest"
    assert detect_format(tmp_path / "yelp_academic_dataset_review.json") == "yelp"
    assert detect_format(tmp_path / "sequential_data.txt") == "p5seq"
    assert detect_format(tmp_path / "x.parquet") == "parquet"
    assert detect_format(tmp_path / "x.csv") == "csv"
    assert detect_format(tmp_path / "notes.txt") is None
    write_lines(tmp_path / "Beauty_5.json", [json.dumps({"reviewerID": "U", "asin": "A", "overall": 1})])
    assert detect_format(tmp_path / "Beauty_5.json") == "amazon2018"
    write_lines(tmp_path / "All_Beauty.jsonl", [json.dumps({"user_id": "U", "parent_asin": "A", "rating": 1})])
    assert detect_format(tmp_path / "All_Beauty.jsonl") == "amazon2023"
    p5 = tmp_path / "p5"
    p5.mkdir()
    write_lines(p5 / "sequential_data.txt", ["1 1"])
    assert detect_format(p5) == "p5seq"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect_format(empty) is None


def test_registry_rules():
    registry: Registry = Registry("thing")

    @registry.register("a")
    def a():
        return 1

    assert registry.get("a") is a and registry.names() == ["a"] and "a" in registry
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda: 2)
    with pytest.raises(KeyError, match="unknown thing 'b'; known: a"):
        registry.get("b")
    assert readers.READERS.names() == sorted([
        "amazon2014", "amazon2018", "amazon2023", "movielens100k", "movielens1m", "movielens-latest", "yelp",
        "p5seq", "recbole", "csv", "jsonl", "parquet"])


# --- Real files ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not MI_FILE.is_file(), reason=f"{MI_FILE} not present")
def test_real_musical_instruments_counts():
    result = read("amazon2014", MI_FILE)
    data = result.interactions
    assert len(data) == 10_261 and result.counts["read"] == 10_261 and result.counts["malformed"] == 0
    assert len(data.unique("user")) == 1_429
    assert len(data.unique("item")) == 900
    assert list(data["user_name"]).count("") == 27
    assert "" not in data.unique("summary")
    assert set(data.unique("rating")) <= {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.skipif(P5_BEAUTY is None or not P5_BEAUTY.is_dir(),
                    reason="P5's Beauty sequences not present ($P5REC_DATA/p5-beauty/; `p5rec data list`)")
def test_real_p5_beauty_counts():
    start = time.perf_counter()
    result = read("p5seq", P5_BEAUTY)
    elapsed = time.perf_counter() - start
    data = result.interactions
    assert len(data) == 198_502 and result.counts["read"] == 22_363
    assert len(data.unique("user")) == 22_363
    assert len(data.unique("item")) == 12_101
    assert data["user"][0] == "A1YJEY40YUW4SE"
    assert elapsed < 10, f"reading P5 Beauty took {elapsed:.1f}s"


def test_undecodable_and_truncated_files_name_the_line(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::1193::5::978300760\n1::661::3::978302109\xff\n")
    with pytest.raises(DataFormatError, match=r"ratings.dat line 2: not valid utf-8 text"):
        read("movielens1m", path)
    assert read("movielens1m", path, on_error="skip").counts["malformed"] == 1
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in [json.loads(AMAZON2014_REVIEWS[0])] * 200).encode())
    (tmp_path / "reviews_Cut.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match=r"reviews_Cut.json.gz line \d+: corrupt or truncated gzip"):
        read("amazon2014", tmp_path / "reviews_Cut.json.gz")


# --- RecBole atomic files ----------------------------------------------------------------------------------------

# The headers of RecBole's ml-100k atomic files (recbole/dataset_example/ml-100k in its wheel), field for field.
ML100K_INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ML100K_ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
ML100K_USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"


def write_recbole_ml100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "ml-100k.inter", [ML100K_INTER_HEADER, "196\t242\t3\t881250949", "186\t302\t3\t891717742",
                                           "22\t377\t1\t878887116", "196\t302\t4.5\t881250950.0"])
    write_lines(folder / "ml-100k.item", [ML100K_ITEM_HEADER, "242\tKolya\t1996\tComedy",
                                          "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller",
                                          "377\tHeavyweights\t1994\tChildren's Comedy"])
    write_lines(folder / "ml-100k.user", [ML100K_USER_HEADER, "196\t49\tM\twriter\t55105"])
    return folder


def test_recbole_folder_or_inter_file(tmp_path, caplog):
    folder = write_recbole_ml100k(tmp_path / "ml-100k")
    assert detect_format(folder) == "recbole" and detect_format(folder / "ml-100k.inter") == "recbole"
    with caplog.at_level("INFO", logger="p5rec.data.readers"):
        result = read("recbole", folder)
    assert "ml-100k.user" in caplog.text  # named as not read, never dropped in silence
    assert_canonical(result)
    assert rows(result)[-1] == {"user": "196", "item": "302", "rating": 4.5, "timestamp": 881250950, "review": "",
                                "summary": "", "user_name": ""}
    assert result.interactions["timestamp"][:3] == [881250949, 891717742, 878887116]
    assert result.counts == {"read": 4, "malformed": 0, "meta_read": 3, "interactions": 4, "items": 3}
    items = {r["item"]: r for r in result.items.to_list()}
    assert items["302"] == {"item": "302", "title": "L.A. Confidential", "brand": "",
                            "categories": ["Crime", "Film-Noir", "Mystery", "Thriller"]}
    assert items["377"]["categories"] == ["Children's", "Comedy"]
    # the .inter file alone: the .item beside it is found
    alone = read("recbole", folder / "ml-100k.inter")
    assert alone.items is not None and alone.items.to_list() == result.items.to_list()
    assert alone.interactions.to_list() == result.interactions.to_list()


def test_recbole_amazon_item_fields_and_other_names(tmp_path):
    folder = tmp_path / "Amazon_Beauty"
    folder.mkdir()
    write_lines(folder / "Amazon_Beauty.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                                                 "U1\tB01\t5.0\t1393545600", "U2\tB02\t\t1393545601"])
    write_lines(folder / "Amazon_Beauty.item", [
        "item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\tcategories:token_seq\tprice:float\tbrand:token",
        "B01\tBio-Active Serum\tBeauty\t461765.0\t'Beauty', 'Skin Care', 'Face'\t12.5\tNadia",
        "B02\tNail File\tBeauty\t\t\t\t"])
    result = read("recbole", folder)
    assert math.isnan(result.interactions["rating"][1])  # a blank float: implicit, not malformed
    assert result.items.to_list() == [
        {"item": "B01", "title": "Bio-Active Serum", "brand": "Nadia", "categories": ["Beauty", "Skin Care", "Face"]},
        {"item": "B02", "title": "Nail File", "brand": "", "categories": []}]
    # non-standard names: --columns, with or without the field's type
    write_lines(folder / "Amazon_Beauty.inter", ["uid:token\tiid:token\tscore:float", "U1\tB01\t5"])
    with pytest.raises(DataFormatError, match=r"Amazon_Beauty.inter line 1: no user field .*user_id:token.*"
                                              r"fields: uid:token, iid:token, score:float"):
        read("recbole", folder)
    with pytest.raises(DataFormatError, match="Amazon_Beauty.item line 1: no 'iid' field"):  # the .item's item field
        read("recbole", folder, columns={"user": "uid:token", "item": "iid", "rating": "score"})
    (folder / "Amazon_Beauty.item").unlink()
    result = read("recbole", folder, columns={"user": "uid:token", "item": "iid", "rating": "score"})
    assert rows(result)[0]["rating"] == 5.0 and result.items is None


@pytest.mark.parametrize("lines, expected", [
    (["user_id\titem_id", "1\t2"], r"x.inter line 1, field 1: 'user_id' is not name:type"),
    (["user_id:token\titem_id:tokn", "1\t2"], r"x.inter line 1, field 2: 'item_id:tokn' is not name:type"),
    (["user_id:token\tuser_id:float", "1\t2"], r"x.inter line 1: field 'user_id' is named twice"),
    (["user_id:token\titem_id:token\trating:float", "1\t2\t3", "1\t2"],
     r"x.inter line 3: expected 3 '\\t'-separated fields \(as in the header\), found 2"),
    (["user_id:token\titem_id:token\trating:float", "1\t2\tfive"], r"x.inter line 2: field 'rating' is not a number"),
    ([], r"x.inter is empty \(expected a header line"),
])
def test_recbole_bad_input_names_file_line_and_field(tmp_path, lines, expected):
    write_lines(tmp_path / "x.inter", lines)
    with pytest.raises(DataFormatError, match=expected):
        read("recbole", tmp_path / "x.inter")


def test_recbole_skip_counts_and_split_files(tmp_path):
    write_lines(tmp_path / "d.inter", ["user_id:token\titem_id:token", "1\t2", "1", "2\t3"])
    result = read("recbole", tmp_path / "d.inter", on_error="skip")
    assert result.counts["malformed"] == 1 and result.interactions["item"] == ["2", "3"]
    write_lines(tmp_path / "d.train.inter", ["user_id:token\titem_id:token", "1\t2"])
    with pytest.raises(ValueError, match="both a whole interaction file and benchmark split files"):
        read("recbole", tmp_path)
    (tmp_path / "d.inter").unlink()
    write_lines(tmp_path / "d.test.inter", ["user_id:token\titem_id:token", "1\t4"])
    assert read("recbole", tmp_path).interactions["item"] == ["4", "2"]  # every split, in name order


def test_csv_reads_tab_separated_files_of_any_extension(tmp_path):
    """The bug report: RecBole's .inter through the generic reader with its typed header names."""
    folder = write_recbole_ml100k(tmp_path / "ml")
    columns = {"user": "user_id:token", "item": "item_id:token", "rating": "rating:float",
               "timestamp": "timestamp:float"}
    detected = read("csv", folder / "ml-100k.inter", columns=columns)
    assert detected.interactions.to_list() == read("recbole", folder).interactions.to_list()
    txt = write_lines(tmp_path / "log.txt", ["user;item;rating", "a;x;1", "b;y;2"])  # semicolons, detected
    assert read("csv", txt).interactions["rating"] == [1.0, 2.0]
    # a separator given by hand wins; a header that did not split says which separator it holds
    with pytest.raises(DataFormatError) as info:
        read("csv", folder / "ml-100k.inter", columns=columns, delimiter=",")
    message = str(info.value)
    assert "available columns: 'user_id:token\\titem_id:token" in message and "pass --delimiter '\\t'" in message
    tab = write_lines(tmp_path / "weird.dat", ["user\titem", "a\tb,c"])  # a comma inside a tab-separated field
    assert read("csv", tab, delimiter="\t").interactions["item"] == ["b,c"]
    with pytest.raises(ValueError, match="a delimiter is one character"):
        read("csv", tab, delimiter="\t\t")
    with pytest.raises(ValueError, match="a delimiter applies to the formats csv, recbole"):
        read("jsonl", tab, delimiter="\t")


def test_every_format_is_described_for_data_list():
    assert set(readers.FORMAT_FILES) == set(readers.READERS.names())


RECBOLE_ML100K = Path(os.environ["P5REC_RECBOLE_ML100K"]) if os.environ.get("P5REC_RECBOLE_ML100K") else None


@pytest.mark.skipif(RECBOLE_ML100K is None or not (RECBOLE_ML100K / "ml-100k.inter").is_file(),
                    reason="RecBole's ml-100k atomic files not present (P5REC_RECBOLE_ML100K; bench/README.md)")
def test_real_recbole_ml100k_counts():
    result = read("recbole", RECBOLE_ML100K)
    assert result.counts["interactions"] == 100_000 and result.counts["malformed"] == 0
    assert len(set(result.interactions["user"])) == 943 and len(set(result.interactions["item"])) == 1682
    assert len(result.items) == 1682 and result.items[0]["title"] == "Toy Story"
