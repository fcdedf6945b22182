"""`p5rec serve`: a real server on 127.0.0.1 (a free port), called over HTTP, on the tiny run of conftest.py.

Every endpoint answers; every malformed request gets a 4xx whose JSON names the field, and the server answers the
next request; concurrent requests are decoded in batches. Bounded: a few dozen requests, 30 s client timeouts,
the server stopped in teardown.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")

from p5rec.cli import main as cli  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """(server, client, P5Rec, run) over the tiny run; the batch window is wide (40 ms) so that concurrent
    requests of the batching tests meet in one window even on a loaded machine."""
    from p5rec.serve.httpserver import ServerThread
    from p5rec.serve.inference import P5Rec
    from p5rec.run import Run
    from p5rec.serve.app import create_app, run_info
    from p5rec.serve.studio import Studio

    run = Run.open(tiny_run, device="cpu")
    rec = P5Rec.from_run(run)
    studio = Studio.for_run(run, save_dir=tmp_path_factory.mktemp("studio-save"))
    app = create_app(rec, run_info(run), max_batch=32, window_ms=40, max_k=50, studio=studio)
    server = ServerThread(app).start()
    client = httpx.Client(base_url=server.url, timeout=30)
    try:
        yield server, client, rec, run
    finally:
        client.close()
        server.stop()


def alive(client) -> None:
    """The server still answers: health, and a good request."""
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/recommend", json={"history": [], "k": 2}).status_code == 200


# ------------------------------------------------------------------------------------------ every endpoint
def test_every_endpoint_answers(served, ids):
    _, client, rec, run = served
    users, items = ids
    history = items[:4]
    r = client.post("/recommend", json={"user": users[0], "history": history, "k": 5})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got["items"]) == 5 and got["batch_size"] >= 1 and got["latency_ms"] > 0
    assert all(p["item"] in run.index.items and p["item"] not in history for p in got["items"])  # raw ids out
    assert [p["item"] for p in got["items"]] == [p.item for p in rec.recommend(history, users[0], k=5)]
    # a user the run never saw: a history-only prompt
    assert client.post("/recommend", json={"user": "NEW-USER", "history": history, "k": 3}).status_code == 200

    cands = items[10:16]
    for body in ({"candidates": cands, "user": users[1]}, {"candidates": cands, "user": users[1], "history": history}):
        r = client.post("/rank", json=body)
        assert r.status_code == 200, r.text
        assert sorted(p["item"] for p in r.json()["items"]) == sorted(cands)

    for path, body, keys in [
        ("/rating", {"user": users[0], "item": items[0]}, {"rating", "text", "expected", "calibrated", "expected_mean", "calibrated_mean"}),
        ("/explain", {"user": users[0], "item": items[0], "feature": "sound"}, {"explanation"}),
        ("/summarize", {"review": "Bright strings that stay in tune for weeks."}, {"summary"}),
        ("/review_rating", {"review": "Bright strings that stay in tune.", "user": users[2]}, {"rating", "text"}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        assert keys <= set(r.json()), (path, r.json())
        if "rating" in keys and r.json()["rating"] is not None:
            assert 1 <= r.json()["rating"] <= 5

    health = client.get("/health").json()
    assert health["status"] == "ok" and health["batching"]["requests"] >= 8
    info = client.get("/run").json()
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert info["fingerprint"] == manifest["fingerprint"] and info["dataset"] == manifest["dataset"]
    assert info["families"] == ["sequential", "direct", "rating", "explanation", "review"]
    assert info["users"] == len(users) and info["items"] == len(items) and "metrics" in info
    spec = client.get("/openapi.json").json()
    for path in ("/recommend", "/rank", "/rating", "/explain", "/summarize", "/review_rating", "/health", "/run"):
        assert path in spec["paths"], path
    assert "history" in json.dumps(spec["paths"]["/recommend"]["post"]["requestBody"])
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------------ malformed requests
MALFORMED = [  # (id, endpoint, body: JSON value or raw bytes, status, field, text the error must contain)
    ("unknown_user", "/rating", {"user": "NOBODY", "item": 0}, 422, "user", "unknown user 'NOBODY'"),
    ("unknown_history_item", "/recommend", {"history": ["NOPE"]}, 422, "history", "unknown item 'NOPE'"),
    ("unknown_candidate", "/rank", {"candidates": [0, "NOPE"]}, 422, "candidates", "unknown item 'NOPE'"),
    ("unknown_item", "/explain", {"user": 0, "item": "NOPE"}, 422, "item", "unknown item 'NOPE'"),
    ("k_zero", "/recommend", {"history": [0], "k": 0}, 422, "k", "field 'k' must be a positive integer, got 0"),
    ("k_negative", "/recommend", {"history": [0], "k": -1}, 422, "k", "got -1"),
    ("k_text", "/recommend", {"history": [0], "k": "abc"}, 422, "k", 'got "abc"'),
    ("k_float", "/recommend", {"history": [0], "k": 2.5}, 422, "k", "got 2.5"),
    ("k_bool", "/recommend", {"history": [0], "k": True}, 422, "k", "got true"),
    ("k_too_large", "/recommend", {"history": [0], "k": 51}, 422, "k", "at most 50"),
    ("missing_item", "/rating", {"user": 0}, 422, "item", "field 'item' is required for task 'rating'"),
    ("missing_candidates", "/rank", {"user": 0}, 422, "candidates", "field 'candidates' is required"),
    ("missing_review", "/summarize", {}, 422, "review", "field 'review' is required"),
    ("history_text", "/recommend", {"history": "abc"}, 422, "history", "field 'history' must be a list of strings"),
    ("history_numbers", "/recommend", {"history": [1, 2]}, 422, "history", "field 'history'"),
    ("user_list", "/rating", {"user": ["a", "b"], "item": 0}, 422, "user", "field 'user' must be a string"),
    ("candidates_number", "/rank", {"candidates": 5}, 422, "candidates", "field 'candidates'"),
    ("empty_review", "/review_rating", {"review": "  "}, 422, "review", "field 'review' must be a non-empty"),
    ("rating_text", "/explain", {"user": 0, "item": 0, "rating": "five"}, 422, "rating", "field 'rating'"),
    ("unknown_template", "/recommend", {"history": [0], "template": "9-99"}, 422, "template", "no template '9-99'"),
    ("template_of_another_family", "/rating", {"user": 0, "item": 0, "template": "2-1"}, 422, "template",
     "belongs to family 'sequential'"),
    ("not_json", "/recommend", b'{"history": [', 400, None, "body is not JSON"),
    ("empty_body", "/rank", b"", 400, None, "body is not JSON"),
    ("not_utf8", "/rank", b"\xff\xfe{", 400, None, "body is not JSON"),
    ("array", "/recommend", b"[1, 2, 3]", 400, None, "body must be a JSON object"),
    ("string", "/rating", b'"hello"', 400, None, "body must be a JSON object"),
    ("deep", "/recommend", b"[" * 100_000 + b"]" * 100_000, 400, None, "body is not JSON"),
    ("too_large", "/summarize", b'{"review": "' + b"a" * (1 << 20) + b'"}', 413, None, "request body of"),
]


def _fill(body: dict, users: list[str], items: list[str]) -> dict:
    """0 in a body stands for a real id: the first user (``user``) or item (``item``, in ``history``/``candidates``)."""
    out = dict(body)
    if out.get("user") == 0:
        out["user"] = users[0]
    if out.get("item") == 0:
        out["item"] = items[0]
    for key in ("history", "candidates"):
        if isinstance(out.get(key), list):
            out[key] = [items[0] if v == 0 else v for v in out[key]]
    return out


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request_is_a_4xx_naming_the_field(served, ids, case):
    _, client, _, _ = served
    _, path, body, status, name, text = case
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=_fill(body, *ids))
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error", "field"} and error["field"] == name, error
    assert text in error["error"] and "\n" not in error["error"], error
    if name is not None:
        assert f"field '{name}'" in error["error"], error
    alive(client)


def test_unknown_paths_and_methods_are_json_errors(served):
    _, client, _, _ = served
    assert client.get("/nowhere").json() == {"error": "Not Found", "field": None}
    r = client.get("/recommend")
    assert r.status_code == 405 and r.json()["error"] == "Method Not Allowed"
    alive(client)


# ------------------------------------------------------------------------------------------ batching
async def _concurrent(url: str, bodies: list[tuple[str, dict]]) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*[client.post(path, json=body) for path, body in bodies])


def test_concurrent_requests_are_batched(served, ids):
    server, client, rec, _ = served
    users, items = ids
    before = client.get("/health").json()["batching"]
    bodies = [("/recommend", {"user": users[i], "history": items[i : i + 3], "k": 4}) for i in range(16)]
    answers = asyncio.run(_concurrent(server.url, bodies))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    sizes = [r.json()["batch_size"] for r in answers]
    assert max(sizes) > 1, sizes
    after = client.get("/health").json()["batching"]
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16 and after["max_batch_size"] > 1, after
    # batching changes nothing but speed: each answer is the one-request answer (up to float rounding)
    for (_, body), r in zip(bodies, answers):
        alone = {p.item: p.score for p in rec.recommend(body["history"], body["user"], k=8)}
        for p in r.json()["items"]:
            assert p["item"] in alone and abs(p["score"] - alone[p["item"]]) < 1e-3


def test_a_refused_request_does_not_sink_its_batch(served, ids):
    """Requests of several tasks in one window, two refused only when their batch is decoded (a template of
    another family; a template that shows the star rating, without one, in a group with good requests): they
    alone get their 422."""
    server, client, _, _ = served
    users, items = ids
    explain = {"user": users[0], "item": items[2]}
    bodies = [("/recommend", {"history": items[:3], "k": 3}), ("/rating", {"user": users[0], "item": items[1]}),
              ("/recommend", {"history": items[3:5], "k": 3, "template": "1-1"}),
              ("/explain", explain), ("/explain", {**explain, "template": "3-2"}),
              ("/explain", {**explain, "template": "3-2", "rating": 4}),
              ("/rank", {"candidates": items[:4]}), ("/recommend", {"history": items[5:8], "k": 3}),
              ("/summarize", {"review": "good value"})]
    answers = asyncio.run(_concurrent(server.url, bodies))
    codes = [r.status_code for r in answers]
    assert codes == [200, 200, 422, 200, 422, 200, 200, 200, 200], [r.text for r in answers]
    assert answers[2].json()["field"] == "template" and answers[4].json()["field"] == "rating"
    assert max(r.json()["batch_size"] for r in answers if r.status_code == 200) > 1
    alive(client)


def test_a_failing_batch_does_not_stop_the_worker():
    """An error inside the batched call (a bug, not a bad request) fails that batch's requests; the next batch is
    answered."""
    from p5rec.serve.app import Batcher

    calls = []

    def answer_batch(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [{"echo": r["n"]} for r in requests]

    async def main():
        batcher = Batcher(answer_batch, max_batch=4, window_ms=20)
        await batcher.start()
        try:
            first = await asyncio.gather(*[batcher.submit({"task": "rating", "n": n}) for n in range(3)])
            second = await asyncio.gather(*[batcher.submit({"task": "rating", "n": n}) for n in range(6)])
        finally:
            await batcher.stop()
        return first, second, batcher.stats

    first, second, stats = asyncio.run(main())
    assert all(isinstance(a, RuntimeError) and size == 3 for a, size in first)
    assert [a["echo"] for a, _ in second] == list(range(6))
    assert max(size for _, size in second) == 4  # max_batch
    assert stats.failed_batches == 1 and stats.requests == 9


def test_a_lone_client_does_not_wait_for_the_window():
    """One request at a time: no company is coming, so the (here very long) window is skipped; concurrent requests
    still wait for each other."""
    from p5rec.serve.app import Batcher

    async def main():
        batcher = Batcher(lambda requests: [{"ok": True} for _ in requests], max_batch=8, window_ms=2000)
        await batcher.start()
        try:
            t0 = time.perf_counter()
            for n in range(3):
                await batcher.submit({"task": "rating", "n": n})
            lone = time.perf_counter() - t0
            together = await asyncio.gather(*[batcher.submit({"task": "rating", "n": n}) for n in range(5)])
        finally:
            await batcher.stop()
        return lone, together

    lone, together = asyncio.run(main())
    assert lone < 1.5, lone  # three windows would be 6 s
    assert [size for _, size in together] == [5] * 5


# ------------------------------------------------------------------------------------------ the command
def test_serve_command_refuses_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    assert cli(["serve", "--run", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p5rec serve: ") and "no such run directory" in err and "\n" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert cli(["serve", "--run", str(tiny_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"p5rec serve: cannot listen on 127.0.0.1:{port}") and "\n" not in err
    assert cli(["serve", "--run", str(tiny_run), "--port", "0", "--save-dir", str(tmp_path / "nope")]) == 2
    assert "--save-dir" in capsys.readouterr().err
    for option, value in (("--max-batch", "0"), ("--port", "99999"), ("--window-ms", "-1"), ("--window-ms", "nan")):
        with pytest.raises(SystemExit):
            cli(["serve", "--run", str(tiny_run), option, value])
        assert f"argument {option}: expected" in capsys.readouterr().err


def test_predict_input_still_batches_and_isolates(tiny_run, ids, tmp_path):
    """``p5rec predict --input`` answers through answer_batch: a line with an unknown id is an error naming its
    line, the others are answered."""
    users, items = ids
    lines = [{"task": "sequential", "history": items[:3], "k": 2}, {"task": "rating", "user": users[0], "item": "X"},
             {"task": "direct", "candidates": items[:3]}, {"task": "sequential", "history": items[3:6], "k": 2,
                                                          "template": "1-1"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert cli(["predict", "--run", str(tiny_run), "--input", str(src), "--output", str(out)]) == 0
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [("error" in a) for a in answers] == [False, True, False, True]
    assert answers[1]["error"].startswith("line 2: unknown item 'X'")
    assert answers[3]["error"].startswith("line 4: template 1-1 belongs to family 'rating'")
    assert len(answers[0]["items"]) == 2 and len(answers[2]["items"]) == 3
