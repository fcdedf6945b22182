"""Build data/samples/mi_tiny.json.gz: a small real slice of the embedded Musical Instruments reviews.

The slice keeps the reviews of the 150 most-reviewed items, then the users with at least 5 of those, so that the
5-core filter keeps a dense little dataset (fast tests that still exercise every task family). Deterministic.

    python data/samples/make_samples.py
"""

import gzip
import json
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "reviews_Musical_Instruments_5.json.gz"


def main(n_items: int = 150, min_user: int = 5) -> None:
    rows = [json.loads(line) for line in gzip.open(SOURCE, "rt", encoding="utf-8")]
    top = {i for i, _ in Counter(r["asin"] for r in rows).most_common(n_items)}
    rows = [r for r in rows if r["asin"] in top]
    users = Counter(r["reviewerID"] for r in rows)
    rows = [r for r in rows if users[r["reviewerID"]] >= min_user]
    out = HERE / "mi_tiny.json.gz"
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime=0: byte-identical rebuilds
        for r in rows:
            f.write((json.dumps(r) + "\n").encode("utf-8"))
    print(f"{out}: {len(rows)} reviews, {len({r['reviewerID'] for r in rows})} users, "
          f"{len({r['asin'] for r in rows})} items")


if __name__ == "__main__":
    main()
