"""The template studio: its JSON API over HTTP, the `p5rec templates studio` command, and the page in Chromium.

The studio checks drafts with the CLI's own functions, so a draft's problems must read exactly as
`p5rec templates validate` prints them; saving never replaces a file without `overwrite`. The browser test drives
the system's Chromium over the DevTools protocol (tests/cdp.py) and skips when there is none.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from cdp import Browser, find_chromium  # noqa: E402

from p5rec.cli import main as cli  # noqa: E402

GOOD = """family: sequential
data: sequential
schema:
  user: "user id surface"
  history: "list of the most recent item surfaces, oldest first"
  target: "the next item surface"
templates:
  - id: "my-1"
    name: "my_next_item"
    seen: true
    scoring: generation
    fields: [user, history, target]
    source: "What will {{ user }} buy after {{ history | ids }}?"
    target: "{{ target }}"
"""
BROKEN = GOOD.replace("{{ history | ids }}", "{{ history | ids }")
SANDBOX = GOOD.replace("{{ history | ids }}", "{{ history.__class__ }}")


@pytest.fixture(scope="module")
def prepared_dir(tiny_run) -> Path:
    return Path(json.loads((tiny_run / "run_config.json").read_text())["prepared_dir"])


@pytest.fixture(scope="module")
def studio(prepared_dir, tmp_path_factory):
    """(server, client, save_dir): the standalone studio over the tiny run's prepared data."""
    from p5rec.serve.httpserver import ServerThread
    from p5rec.serve.studio import Studio, create_app

    save_dir = tmp_path_factory.mktemp("saved")
    server = ServerThread(create_app(Studio.for_dataset(prepared_dir, save_dir))).start()
    client = httpx.Client(base_url=f"{server.url}/studio/api/", timeout=30)
    try:
        yield server, client, save_dir
    finally:
        client.close()
        server.stop()


def test_catalog_lists_families_and_templates(studio):
    _, client, save_dir = studio
    catalog = client.get("catalog").json()
    families = {f["family"]: f for f in catalog["families"]}
    assert {"sequential", "direct", "rating", "explanation", "review"} <= set(families)
    two_one = next(t for t in families["sequential"]["templates"] if t["id"] == "2-1")
    assert two_one["seen"] is True and two_one["scoring"] == "generation" and "history" in two_one["fields"]
    assert any(not t["seen"] for t in families["sequential"]["templates"])
    assert catalog["dataset"]["synthetic"] is False and catalog["dataset"]["items"] > 0
    assert catalog["save_dir"] == str(save_dir.resolve())


def test_render_maps_ids_back_to_raw_ids(studio, ids):
    _, client, _ = studio
    users, items = ids
    result = client.post("render", json={"template": "2-1", "split": "test", "n": 3}).json()
    assert len(result["rows"]) == 3
    for row in result["rows"]:
        chips = [s for s in row["source"] if "kind" in s]
        assert {s["kind"] for s in chips} == {"user", "item"}
        assert all(s["raw"] in (users if s["kind"] == "user" else items) for s in chips)
        assert "".join(s["text"] for s in row["source"]) == row["source_text"]  # nothing lost
        assert [s["raw"] for s in row["target"] if "kind" in s] == [row["item"]]
    # a family whose table the dataset lacks, an unknown id, a bad split: one error naming the field
    r = client.post("render", json={"template": "9-99"})
    assert r.status_code == 422 and r.json()["field"] == "template" and "no template '9-99'" in r.json()["error"]
    r = client.post("render", json={"template": "2-1", "split": "dev"})
    assert r.status_code == 422 and r.json()["field"] == "split"
    r = client.post("render", json={"template": "2-1", "n": "many"})
    assert r.status_code == 422 and r.json()["field"] == "n"


def test_draft_problems_read_as_the_cli_prints_them(studio, tmp_path, capsys):
    from p5rec.serve.httpserver import ServerThread
    from p5rec.serve.studio import Studio, create_app

    _, client, _ = studio
    for text, kind in ((BROKEN, "jinja"), (SANDBOX, "sandbox")):
        cli_file = tmp_path / "draft.yaml"
        cli_file.write_text(text)
        assert cli(["templates", "validate", str(cli_file)]) == 1
        printed = [line for line in capsys.readouterr().out.splitlines() if not line.endswith("problem(s)")]
        # a studio saving into the CLI file's directory names the draft by the same path
        with ServerThread(create_app(Studio.for_dataset(None, tmp_path))) as server:
            report = httpx.post(f"{server.url}/studio/api/check", json={"filename": "draft.yaml", "text": text},
                                timeout=30).json()
        assert report["ok"] is False and [p["text"] for p in report["problems"]] == printed, (report, printed)
        assert report["problems"][0]["kind"] == kind
    report = client.post("check", json={"text": GOOD}).json()
    assert report["ok"] and [t["id"] for t in report["templates"]] == ["my-1"]
    # an id the shipped templates use: what train.py --template_files would refuse
    report = client.post("check", json={"text": GOOD.replace('"my-1"', '"2-1"')}).json()
    assert not report["ok"] and report["problems"][0]["kind"] == "duplicate_id"


def test_draft_preview_renders_on_real_records(studio, ids):
    _, client, _ = studio
    result = client.post("preview", json={"text": GOOD, "n": 2}).json()
    assert result["check"]["ok"]
    rows = result["render"]["rows"]
    assert len(rows) == 2 and rows[0]["source_text"].startswith("What will <u")
    assert result["render"]["template"]["id"] == "my-1"
    result = client.post("preview", json={"text": BROKEN}).json()
    assert result["render"] is None and not result["check"]["ok"]


def test_save_never_overwrites_unless_told(studio):
    _, client, save_dir = studio
    target = save_dir / "mine.yaml"
    r = client.post("save", json={"filename": "mine.yaml", "text": GOOD})
    assert r.status_code == 200, r.text
    assert r.json()["saved"] == str(target) and target.read_text() == GOOD
    assert "--template_files" in r.json()["train"]
    changed = GOOD.replace("buy after", "want after")
    r = client.post("save", json={"filename": "mine.yaml", "text": changed})
    assert r.status_code == 409 and r.json()["field"] == "overwrite" and target.read_text() == GOOD
    r = client.post("save", json={"filename": "mine.yaml", "text": changed, "overwrite": True})
    assert r.status_code == 200 and target.read_text() == changed
    # an invalid draft, a name outside the save directory: refused, nothing written
    r = client.post("save", json={"filename": "broken.yaml", "text": BROKEN})
    assert r.status_code == 422 and r.json()["field"] == "text" and not (save_dir / "broken.yaml").exists()
    for name in ("../escape.yaml", "sub/dir.yaml", "notes.txt", ".hidden.yaml", ""):
        r = client.post("save", json={"filename": name, "text": GOOD})
        assert r.status_code == 422 and r.json()["field"] == "filename", name
    assert sorted(p.name for p in save_dir.iterdir()) == ["mine.yaml"]  # no temporary left behind
    # what train.py --template_files loads, and the CLI validates and previews
    from p5rec.prompts.templates import load_templates

    assert "my-1" in load_templates(paths=[target])
    assert cli(["templates", "validate", str(target)]) == 0


def test_studio_command(prepared_dir, tmp_path, capsys):
    """`p5rec templates studio` in a subprocess: it serves the page and the API; bad input is one line."""
    assert cli(["templates", "studio", "--dataset", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p5rec templates studio: ") and "\n" not in err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "p5rec.cli", "templates", "studio", "--dataset", str(prepared_dir), "--port",
         str(port), "--save-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        page = None
        end = time.monotonic() + 60
        while page is None and time.monotonic() < end and process.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/studio/", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
        assert page is not None and page.status_code == 200, process.stderr.read1().decode() if process.poll() else ""
        assert "template studio" in page.text
        report = httpx.post(f"http://127.0.0.1:{port}/studio/api/check", json={"text": BROKEN}, timeout=30).json()
        assert report["problems"][0]["text"].startswith(f"{tmp_path / 'my_templates.yaml'}:8: [my-1] jinja: ")
    finally:
        process.terminate()
        process.wait(15)


# ------------------------------------------------------------------------------------------ in a browser
@pytest.mark.skipif(find_chromium() is None, reason="no chromium binary (apt-get install chromium) for the browser "
                                                   "test of the studio page")
def test_studio_page_in_chromium(studio, ids, tmp_path):
    """Load the page, render 2-1 on real records, type a broken template and see the CLI's error, fix it and see
    it previewed."""
    server, _, _ = studio
    users, items = ids
    with Browser.launch(width=1280, height=860) as browser:
        browser.navigate(f"{server.url}/studio/")
        n = browser.evaluate("waitFor(() => document.querySelectorAll('#template-list [data-id]').length)")
        assert n > 50
        raws = browser.evaluate("""(async () => {
            document.querySelector('#template-list [data-id="2-1"]').click();
            await waitFor(() => document.querySelectorAll('#rows[data-template="2-1"] tr.row').length, 20000, 'rows');
            return [...document.querySelectorAll('#rows tr.row .id')].map((c) => [c.dataset.kind, c.dataset.raw,
                                                                               c.textContent]);
        })()""")
        assert raws and all(raw in (users if kind == "user" else items) and text == raw for kind, raw, text in raws)
        problem = browser.evaluate(f"""(async () => {{
            document.getElementById('tab-write').click();
            const editor = document.getElementById('editor');
            editor.value = {json.dumps(BROKEN)};
            editor.dispatchEvent(new Event('input'));
            const li = await waitFor(() => document.querySelector('#problems li'), 20000, 'a problem');
            return [li.textContent, document.getElementById('check-status').textContent,
                    document.getElementById('save-btn').disabled];
        }})()""")
        assert re.search(r"my_templates\.yaml:8: \[my-1\] jinja: source: unexpected '}'", problem[0]), problem
        assert "1 problem" in problem[1] and problem[2] is True
        fixed = browser.evaluate(f"""(async () => {{
            const editor = document.getElementById('editor');
            editor.value = {json.dumps(GOOD)};
            editor.dispatchEvent(new Event('input'));
            await waitFor(() => document.getElementById('check-status').textContent.includes('valid'), 20000, 'valid');
            await waitFor(() => document.querySelectorAll('#draft-rows tr.row').length, 20000, 'preview rows');
            return [document.querySelectorAll('#problems li').length, document.getElementById('save-btn').disabled,
                    document.querySelector('#draft-rows tr.row td.source').textContent];
        }})()""")
        assert fixed[0] == 0 and fixed[1] is False and fixed[2].startswith("What will "), fixed
        browser.screenshot(tmp_path / "studio.png")
    assert (tmp_path / "studio.png").stat().st_size > 10_000


@pytest.mark.parametrize("form, text", [
    ("token", "<u17> bought <a3><b0><c12><a3><b0><c1>, then <i9>?"),
    ("text", "user_17 bought item_3_0_12 , item_3_0_1, then item_9?"),
])
def test_id_mapper_finds_every_surface(form, text):
    """Collaborative ids are runs of level tokens, and one id may begin another's text form: each is found whole."""
    from p5rec.data.indexing import Index
    from p5rec.serve.studio import IdMapper

    index = Index("collaborative", {"U17": "17"}, {"A": "3-0-12", "B": "3-0-1", "C": "9"})
    segments = IdMapper(index, form, {"A": "Strings"}).segments(text)
    found = [(s["kind"], s["raw"], s.get("title")) for s in segments if "kind" in s]
    assert found == [("user", "U17", None), ("item", "A", "Strings"), ("item", "B", None), ("item", "C", None)]
    assert "".join(s["text"] for s in segments) == text
