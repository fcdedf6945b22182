"""Non-neural baselines, scored on the same splits and by the same metric functions as the model.

Inputs are the prepared split tables of design.md section 2 (``datasets.Dataset``; a mapping of column name
to list works too), with raw string ids. Every baseline returns predictions in the form the model's
evaluation produces (ranked id lists, ratings, texts), so :mod:`p5rec.eval.metrics` scores both alike.

* Ranking: :func:`popularity_ranking` (sequential, full ranking), :func:`popularity_direct` (100 candidates).
* Rating: :func:`global_mean_rating`, :class:`BiasedMF` (mu + b_u + b_i [+ p_u.q_i], ALS in numpy).
* Text: :func:`nearest_review_baseline` (explanations), :func:`nearest_text_by_input` (summaries), both
  TF-IDF nearest neighbours built with scipy.sparse; :func:`most_common_text` (one sentence for every case) and
  :func:`most_common_text_by` (one sentence per key, e.g. per feature word).

Nothing here looks at test targets except the convenience ``*_eval`` functions, which only score.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from p5rec.eval.metrics import rouge_tokenize

logger = logging.getLogger(__name__)

__all__ = [
    "BiasedMF",
    "TfidfVectorizer",
    "global_mean_rating",
    "item_popularity",
    "most_common_text",
    "most_common_text_by",
    "nearest_review_baseline",
    "nearest_text_by_input",
    "popularity_direct",
    "popularity_ranking",
]

Rows = Any  # datasets.Dataset or Mapping[str, Sequence]: anything with rows[column] -> sequence


def _col(rows: Rows, name: str) -> list:
    """One column as a plain list (``datasets`` returns a lazy Column object)."""
    try:
        return list(rows[name])
    except KeyError as err:
        raise KeyError(f"table has no column {name!r}") from err


# ---------------------------------------------------------------------------------------------------------
# Popularity (ranking)
# ---------------------------------------------------------------------------------------------------------


def item_popularity(train_items: Iterable[str]) -> Counter:
    """Interaction count per item in the training part (the caller decides what "training part" means)."""
    return Counter(train_items)


def _popularity_order(counts: Mapping[str, int]) -> list[str]:
    # most interacted first; ties broken by the item id string, ascending (deterministic, blind to the target)
    return sorted(counts, key=lambda item: (-counts[item], item))


def popularity_ranking(
    train_items: Sequence[str],
    k: int,
    exclude: Sequence[Sequence[str]] | None = None,
    *,
    n_users: int | None = None,
) -> list[list[str]]:
    """Top-``k`` most-interacted training items for every user.

    Args:
        train_items: every item occurrence in the training part (one entry per interaction).
        k: list length.
        exclude: per-user items to remove before taking the top ``k`` (each user's history). Its length gives
            the number of users.
        n_users: number of users when ``exclude`` is None (every user gets the same list, as a fresh copy).

    Returns:
        one list of ``k`` raw item ids per user (shorter only if the catalogue runs out). Ties in count are
        broken by item id string, ascending.
    """
    if k < 1:
        raise ValueError(f"popularity_ranking: k must be >= 1, got {k}")
    order = _popularity_order(item_popularity(train_items))
    if exclude is None:
        if n_users is None:
            raise ValueError("popularity_ranking: give exclude or n_users")
        top = order[:k]
        return [list(top) for _ in range(n_users)]
    out: list[list[str]] = []
    for history in exclude:
        seen = set(history)
        ranked: list[str] = []
        for item in order:  # walks at most len(seen) + k items
            if item not in seen:
                ranked.append(item)
                if len(ranked) == k:
                    break
        out.append(ranked)
    return out


def popularity_direct(test_rows: Rows, train_counts: Mapping[str, int]) -> list[list[str]]:
    """Rank each user's ``candidates`` (100 in P5's protocol) by training popularity.

    Items absent from ``train_counts`` count 0. Ties are broken by item id string, ascending, which is
    deterministic and unrelated to which candidate is the target.
    """
    return [sorted(cands, key=lambda item: (-train_counts.get(item, 0), item))
            for cands in _col(test_rows, "candidates")]


# ---------------------------------------------------------------------------------------------------------
# Rating
# ---------------------------------------------------------------------------------------------------------


def global_mean_rating(train_ratings: Sequence[float]) -> float:
    """Mean training rating (NaN = implicit rows ignored). Also the fallback for unparseable model outputs."""
    ratings = np.asarray(train_ratings, dtype=np.float64)
    ratings = ratings[~np.isnan(ratings)]
    if ratings.size == 0:
        raise ValueError("global_mean_rating: no explicit training ratings")
    return float(ratings.mean())


class BiasedMF:
    """Biased matrix factorisation ``r = mu + b_u + b_i (+ p_u . q_i)``, fitted by regularised ALS in numpy.

    ``mu`` is the training mean. Each sweep solves, in closed form and in this order, the user biases, the
    item biases, then (if ``n_factors > 0``) the user and the item factors, each given the others: a ridge
    problem per user / item, batched with sparse sums and ``np.linalg.solve``. Deterministic: factors start
    from ``np.random.default_rng(seed)``, biases from 0. Stops after ``n_iters`` sweeps or when the training
    RMSE improves by less than ``tol``.

    Args:
        n_factors: rank of ``p_u . q_i``; 0 (default) is the pure bias model.
        reg_bias: L2 penalty ``lambda`` on each bias (shrinks toward 0 like ``sum(r - ...)/(n + lambda)``).
        reg_factors: L2 penalty on each factor vector.
        n_iters, tol, seed, init_scale: ALS sweeps, early-stop tolerance, RNG seed, factor init std.

    ``predict`` gives an unknown user (item) bias 0 and factor 0; predictions are not clipped
    (:func:`p5rec.eval.metrics.rating_metrics` clips to the rating range).
    """

    def __init__(
        self,
        n_factors: int = 0,
        reg_bias: float = 5.0,
        reg_factors: float = 5.0,
        n_iters: int = 20,
        tol: float = 1e-6,
        seed: int = 0,
        init_scale: float = 0.1,
    ) -> None:
        if n_factors < 0 or reg_bias < 0 or reg_factors < 0 or n_iters < 1:
            raise ValueError("BiasedMF: n_factors, reg_bias, reg_factors must be >= 0 and n_iters >= 1")
        self.n_factors = n_factors
        self.reg_bias = reg_bias
        self.reg_factors = reg_factors
        self.n_iters = n_iters
        self.tol = tol
        self.seed = seed
        self.init_scale = init_scale
        self.mu: float = float("nan")
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.user_bias = np.zeros(0)
        self.item_bias = np.zeros(0)
        self.user_factors = np.zeros((0, n_factors))
        self.item_factors = np.zeros((0, n_factors))
        self.train_rmse: list[float] = []

    def fit(self, users: Sequence[str], items: Sequence[str], ratings: Sequence[float]) -> BiasedMF:
        """Fit on parallel sequences of raw user ids, raw item ids and ratings (NaN rows are dropped)."""
        r = np.asarray(ratings, dtype=np.float64)
        if not (len(users) == len(items) == len(r)):
            raise ValueError("BiasedMF.fit: users, items, ratings differ in length")
        keep = ~np.isnan(r)
        if not keep.all():
            logger.info("BiasedMF.fit: dropping %d rows without a rating", int((~keep).sum()))
        if not keep.any():
            raise ValueError("BiasedMF.fit: no explicit ratings")
        user_names, u = np.unique(np.asarray(users, dtype=object)[keep].astype(str), return_inverse=True)
        item_names, i = np.unique(np.asarray(items, dtype=object)[keep].astype(str), return_inverse=True)
        r = r[keep]
        n_u, n_i, f = len(user_names), len(item_names), self.n_factors
        self.user_index = {name: j for j, name in enumerate(user_names.tolist())}
        self.item_index = {name: j for j, name in enumerate(item_names.tolist())}
        self.mu = float(r.mean())
        bu, bi = np.zeros(n_u), np.zeros(n_i)
        rng = np.random.default_rng(self.seed)
        P = rng.normal(0.0, self.init_scale, (n_u, f))
        Q = rng.normal(0.0, self.init_scale, (n_i, f))
        n_per_user = np.bincount(u, minlength=n_u)
        n_per_item = np.bincount(i, minlength=n_i)
        # user x item incidence (one entry per rating) for batched per-row sums
        incidence = sp.csr_matrix((np.ones_like(r), (u, i)), shape=(n_u, n_i))
        self.train_rmse = []
        for sweep in range(self.n_iters):
            dot = np.einsum("nf,nf->n", P[u], Q[i]) if f else 0.0
            bu = np.bincount(u, r - self.mu - bi[i] - dot, minlength=n_u) / (n_per_user + self.reg_bias)
            bi = np.bincount(i, r - self.mu - bu[u] - dot, minlength=n_i) / (n_per_item + self.reg_bias)
            if f:
                resid = r - self.mu - bu[u] - bi[i]
                P = self._solve_factors(incidence, u, i, resid, Q)
                Q = self._solve_factors(incidence.T.tocsr(), i, u, resid, P)
                dot = np.einsum("nf,nf->n", P[u], Q[i])
            rmse = float(np.sqrt(np.mean((r - self.mu - bu[u] - bi[i] - dot) ** 2)))
            self.train_rmse.append(rmse)
            if sweep and self.train_rmse[-2] - rmse < self.tol:
                break
        self.user_bias, self.item_bias, self.user_factors, self.item_factors = bu, bi, P, Q
        logger.info("BiasedMF: %d users, %d items, %d ratings, %d sweeps, train RMSE %.4f",
                    n_u, n_i, len(r), len(self.train_rmse), self.train_rmse[-1])
        return self

    def _solve_factors(self, incidence: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray, resid: np.ndarray,
                       other: np.ndarray) -> np.ndarray:
        """Ridge solution for every row's factor vector given the other side's factors.

        Gram matrices ``sum_j q_j q_j^T`` come from one sparse product with the flattened outer products.
        """
        f = other.shape[1]
        outer = np.einsum("jf,jg->jfg", other, other).reshape(-1, f * f)
        gram = (incidence @ outer).reshape(-1, f, f) + self.reg_factors * np.eye(f)
        rhs = np.zeros((incidence.shape[0], f))
        np.add.at(rhs, rows, resid[:, None] * other[cols])
        return np.linalg.solve(gram, rhs[..., None])[..., 0]

    def predict(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        """Predicted ratings, float array ``[n]``; unknown ids contribute 0 beyond ``mu``."""
        if math.isnan(self.mu):
            raise RuntimeError("BiasedMF.predict before fit")
        if len(users) != len(items):
            raise ValueError("BiasedMF.predict: users and items differ in length")
        u = np.array([self.user_index.get(str(x), -1) for x in users], dtype=np.int64)
        i = np.array([self.item_index.get(str(x), -1) for x in items], dtype=np.int64)
        known_u, known_i = u >= 0, i >= 0
        pred = np.full(len(u), self.mu)
        pred[known_u] += self.user_bias[u[known_u]]
        pred[known_i] += self.item_bias[i[known_i]]
        both = known_u & known_i
        if self.n_factors and both.any():
            pred[both] += np.einsum("nf,nf->n", self.user_factors[u[both]], self.item_factors[i[both]])
        return pred


# ---------------------------------------------------------------------------------------------------------
# Text: TF-IDF nearest neighbours
# ---------------------------------------------------------------------------------------------------------


class TfidfVectorizer:
    """Minimal TF-IDF (no sklearn): ``rouge_tokenize`` tokens, raw counts x smooth idf, rows L2-normalised.

    ``idf = ln((1 + N) / (1 + df)) + 1`` over the ``N`` fitted documents (sklearn's smooth idf). Tokens that
    occur in more than ``max_df`` of the documents are dropped (a stop-word substitute that keeps the
    similarity products sparse on large corpora; 1.0 keeps all). Unknown tokens are ignored at transform.
    """

    def __init__(self, max_df: float = 1.0) -> None:
        if not 0.0 < max_df <= 1.0:
            raise ValueError(f"max_df must be in (0, 1], got {max_df}")
        self.max_df = max_df
        self.vocab: dict[str, int] = {}
        self.idf = np.zeros(0)

    def _counts(self, texts: Sequence[str], grow: bool) -> sp.csr_matrix:
        indptr, indices, data = [0], [], []
        for text in texts:
            row = Counter(rouge_tokenize(text))
            for tok, c in row.items():
                j = self.vocab.get(tok)
                if j is None and grow:
                    j = self.vocab[tok] = len(self.vocab)
                if j is not None:
                    indices.append(j)
                    data.append(c)
            indptr.append(len(indices))
        return sp.csr_matrix((np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), indptr),
                             shape=(len(texts), len(self.vocab)))

    def fit_transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        self.vocab = {}
        tf = self._counts(texts, grow=True)
        n = max(len(texts), 1)
        df = np.bincount(tf.indices, minlength=tf.shape[1])
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        self.idf[df > self.max_df * n] = 0.0
        return self._weight(tf)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        return self._weight(self._counts(texts, grow=False))

    def _weight(self, tf: sp.csr_matrix) -> sp.csr_matrix:
        x = sp.csr_matrix(tf @ sp.diags(self.idf))
        x.eliminate_zeros()
        return _l2_normalise(x)


def _l2_normalise(x: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ x)


def _most_common(texts: Iterable[str]) -> str:
    # Counter.most_common keeps first-seen order among equal counts: deterministic given row order
    return Counter(texts).most_common(1)[0][0]


def most_common_text(train_texts: Iterable[str], n: int) -> list[str]:
    """The most frequent non-empty training text, ``n`` times: the constant output a model that ignores its
    input falls back to, as a floor for the text families (it scores well on ROUGE against short references)."""
    texts = [t for t in train_texts if t and t.strip()]
    if not texts:
        raise ValueError("most_common_text: no non-empty training texts")
    return [_most_common(texts)] * n


def lcs_f1(candidate: Sequence[int], refs: np.ndarray, ref_lens: np.ndarray) -> np.ndarray:
    """ROUGE-L F-measure (sentence-level LCS, x1) of one tokenised candidate against every row of ``refs``.

    ``refs`` is [n, L] token ids padded with -1, ``ref_lens`` their lengths. The LCS table is filled one candidate
    token at a time over all references at once (L vector steps per candidate token), which is what lets
    :func:`best_constant_text` try hundreds of sentences against a thousand references in about a second.
    """
    n, width = refs.shape
    m = len(candidate)
    if m == 0 or width == 0:
        return np.zeros(n)
    prev = np.zeros((n, width + 1), dtype=np.int32)
    for tok in candidate:
        cur = np.zeros_like(prev)
        hit = refs == tok
        for j in range(1, width + 1):
            cur[:, j] = np.where(hit[:, j - 1], prev[:, j - 1] + 1, np.maximum(prev[:, j], cur[:, j - 1]))
        prev = cur
    lcs = prev[:, width].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = lcs / m, lcs / np.maximum(ref_lens, 1)  # lcs > 0 only where the reference has tokens
        f = np.where(lcs > 0, 2 * precision * recall / (precision + recall), 0.0)
    return f


def best_constant_text(train_texts: Iterable[str], n_candidates: int = 200, n_references: int = 1000,
                       seed: int = 42) -> tuple[str, float]:
    """The training text that, written for every case, scores the highest mean ROUGE-L against the training texts.

    The ``n_candidates`` most frequent non-empty training texts are tried against a seeded sample of
    ``n_references`` training texts (references longer than 64 ROUGE tokens are cut there). Chosen on the training
    split only, it is the best a model that ignores its input can do by picking its one sentence well; the most
    common text is a weaker constant (measured on MI: ROUGE-L 5.25 against 12.89 on validation explanations).
    Returns the sentence and its mean ROUGE-L (x100) on the training sample.
    """
    texts = [t for t in train_texts if t and t.strip()]
    if not texts:
        raise ValueError("best_constant_text: no non-empty training texts")
    candidates = [t for t, _ in Counter(texts).most_common(n_candidates)]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(texts), size=min(n_references, len(texts)), replace=False)
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in rouge_tokenize(texts[i])[:64]] for i in picked]
    width = max((len(r) for r in ids), default=0)
    refs = np.full((len(ids), width), -1, dtype=np.int64)
    for k, r in enumerate(ids):
        refs[k, : len(r)] = r
    ref_lens = np.array([len(r) for r in ids])
    best, best_score = candidates[0], -1.0
    for cand in candidates:
        toks = [vocab.get(w, -2) for w in rouge_tokenize(cand)]  # a word no reference has matches nothing
        score = float(lcs_f1(toks, refs, ref_lens).mean()) if toks else 0.0
        if score > best_score:
            best, best_score = cand, score
    return best, 100.0 * best_score


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two short token sequences (one DP row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j - 1] of the row before
        for j, y in enumerate(b, 1):
            up = row[j]
            row[j] = diag + 1 if x == y else (up if up > row[j - 1] else row[j - 1])
            diag = up
    return row[-1]


def most_typical_text(texts: Sequence[str]) -> str:
    """Of a few texts, the one with the highest mean ROUGE-L F-measure against the others (their medoid): the
    choice among them that reads nothing about the case. Ties go to the earlier text; one text is its own.

    The LCS of each pair is computed once, in plain Python: for 8 real explanations that is 16 times faster than
    :func:`lcs_f1`'s vector steps (which pay off against hundreds of references), with the same choices."""
    if not texts:
        raise ValueError("most_typical_text: no texts")
    if len(texts) == 1:
        return texts[0]
    toks = [rouge_tokenize(t)[:64] for t in texts]
    n = len(toks)
    lcs = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            lcs[i, j] = lcs[j, i] = lcs_length(toks[i], toks[j])
    lens = np.array([len(t) for t in toks], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / lens[:, None]  # row: the candidate, column: the reference
        recall = lcs / np.maximum(lens, 1)[None, :]
        f = np.where(lcs > 0, 2 * precision * recall / (precision + recall), 0.0)
    others = ~np.eye(n, dtype=bool)
    scores = [float(f[k][others[k]].mean()) if toks[k] else 0.0 for k in range(n)]
    return texts[int(np.argmax(scores))]


def most_common_text_by(train_keys: Sequence[str], train_texts: Sequence[str], test_keys: Sequence[str]) -> list[str]:
    """Per test row, the most frequent non-empty training text among the training rows with the same key (for
    explanations, the feature word a hint template names): what copying the hint alone reaches. A key no
    training row has falls back to the most frequent training text overall. Ties keep first-seen order."""
    if len(train_keys) != len(train_texts):
        raise ValueError(f"most_common_text_by: {len(train_keys)} keys for {len(train_texts)} texts")
    by_key: dict[str, Counter] = defaultdict(Counter)
    for key, text in zip(train_keys, train_texts):
        if text and text.strip():
            by_key[key][text] += 1
    if not by_key:
        raise ValueError("most_common_text_by: no non-empty training texts")
    best = {key: counts.most_common(1)[0][0] for key, counts in by_key.items()}
    overall = _most_common(t for t in train_texts if t and t.strip())
    return [best.get(key, overall) for key in test_keys]


def nearest_review_baseline(train_rows: Rows, test_rows: Rows, field: str = "explanation",
                            max_df: float = 1.0) -> list[str]:
    """Predict each test row's ``field`` text by copying one training row's ``field`` text.

    Rule, per test (user, item): among the training rows of the same item (non-empty ``field``), take the
    one whose text has the highest TF-IDF cosine to the test user's profile, the TF-IDF of all that user's
    training ``field`` texts concatenated (the "most similar to what this user writes" neighbour; ties -> the
    earlier row). Fallbacks, in order: the item's most common training text (no profile, or every cosine is
    0), then the global most common training text (item unseen). Rows with an empty ``field`` are ignored.

    Returns:
        one text per test row, in order. The counts of each path are logged.
    """
    users, items, texts = _col(train_rows, "user"), _col(train_rows, "item"), _col(train_rows, field)
    keep = [j for j, t in enumerate(texts) if t and str(t).strip()]
    if not keep:
        raise ValueError(f"nearest_review_baseline: no non-empty training {field!r} texts")
    users = [users[j] for j in keep]
    items = [items[j] for j in keep]
    texts = [texts[j] for j in keep]
    vec = TfidfVectorizer(max_df=max_df)
    x = vec.fit_transform(texts)

    user_ids = {name: j for j, name in enumerate(dict.fromkeys(users))}
    # profile = tf-idf of the concatenated texts: sum the raw-count rows, then weight and normalise
    member = sp.csr_matrix((np.ones(len(users)), ([user_ids[name] for name in users], np.arange(len(users)))),
                           shape=(len(user_ids), len(users)))
    profiles = vec._weight(member @ vec._counts(texts, grow=False))

    rows_of_item: dict[str, list[int]] = defaultdict(list)
    for j, item in enumerate(items):
        rows_of_item[item].append(j)
    global_text = _most_common(texts)
    test_users, test_items = _col(test_rows, "user"), _col(test_rows, "item")
    preds: list[str] = [global_text] * len(test_users)
    tests_of_item: dict[str, list[int]] = defaultdict(list)
    for t, item in enumerate(test_items):
        tests_of_item[item].append(t)
    n_sim = n_item = n_global = 0
    for item, tests in tests_of_item.items():
        cand = rows_of_item.get(item)
        if not cand:
            n_global += len(tests)
            continue
        item_text = _most_common(texts[j] for j in cand)
        with_profile = [t for t in tests if test_users[t] in user_ids]
        for t in tests:
            preds[t] = item_text
        n_item += len(tests) - len(with_profile)
        if not with_profile:
            continue
        sims = (profiles[[user_ids[test_users[t]] for t in with_profile]] @ x[cand].T).toarray()
        best = sims.argmax(axis=1)  # first maximum = earliest row on ties
        for t, b, row in zip(with_profile, best, sims):
            if row[b] > 0:
                preds[t] = texts[cand[b]]
                n_sim += 1
            else:
                n_item += 1
    logger.info("nearest_review_baseline[%s]: %d by similarity, %d item fallback, %d global fallback",
                field, n_sim, n_item, n_global)
    return preds


def nearest_text_by_input(train_rows: Rows, test_rows: Rows, input: str = "review", field: str = "summary",
                          max_df: float = 1.0, chunk_cells: int = 10_000_000) -> list[str]:
    """Predict each test row's ``field`` text (a review's summary): the ``field`` of the training row whose
    ``input`` text (the review) is the most TF-IDF-similar.

    The input is known at test time (review summarisation), so the neighbour is found on ``input`` text among
    training rows with a non-empty ``input`` and ``field``; ties -> the earlier row; no shared token -> the global
    most common training ``field``. Scored in chunks of test rows so that the dense ``chunk x n_train``
    similarity block stays under ``chunk_cells`` cells.
    """
    sources, texts = _col(train_rows, input), _col(train_rows, field)
    keep = [j for j, (r, s) in enumerate(zip(sources, texts)) if str(r).strip() and str(s).strip()]
    if not keep:
        raise ValueError(f"nearest_text_by_input: no training rows with both {input!r} and {field!r}")
    sources = [sources[j] for j in keep]
    texts = [texts[j] for j in keep]
    vec = TfidfVectorizer(max_df=max_df)
    x_t = vec.fit_transform(sources).T.tocsc()
    queries = vec.transform(_col(test_rows, input))
    fallback = _most_common(texts)
    step = max(1, chunk_cells // max(len(sources), 1))
    preds: list[str] = []
    n_fallback = 0
    for start in range(0, queries.shape[0], step):
        sims = (queries[start : start + step] @ x_t).toarray()
        best = sims.argmax(axis=1)
        for b, row in zip(best, sims):
            if row[b] > 0:
                preds.append(texts[b])
            else:
                preds.append(fallback)
                n_fallback += 1
    logger.info("nearest_text_by_input(%s -> %s): %d test rows, %d global fallback", input, field, len(preds),
                n_fallback)
    return preds
