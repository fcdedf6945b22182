"""Screenshots of the template studio for the README (docs/studio.png, docs/studio-write.png).

    OMP_NUM_THREADS=1 python docs/studio_screenshot.py --run runs/<run>      # needs a chromium binary

Serves the run (``p5rec serve``'s app, in this process, on a free port of 127.0.0.1), opens ``/studio/`` in headless
Chromium through tests/cdp.py, renders a template on the run's test records, then types a template with a Jinja error
into the editor; one screenshot after each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cdp import Browser  # noqa: E402

BROKEN = """family: sequential
data: sequential
schema:
  user: "user id surface"
  history: "list of the most recent item surfaces, oldest first"
  target: "the next item surface"
templates:
  - id: "my-next"
    name: "my_next_item"
    seen: true
    scoring: generation
    fields: [user, history, target]
    source: "What will {{ user }} buy after {{ history | ids }}?"
    target: "{{ target }}"
  - id: "my-next-2"
    name: "my_next_item_broken"
    seen: true
    scoring: generation
    fields: [user, history, target]
    source: "{{ user }} bought {{ history | ids }. Next?"
    target: "{{ target }}"
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--template", default="2-1")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)

    from p5rec.serve.httpserver import ServerThread
    from p5rec.serve.inference import P5Rec
    from p5rec.run import Run
    from p5rec.serve.app import create_app, run_info
    from p5rec.serve.studio import Studio

    run = Run.open(args.run, "cpu")
    # save_dir "." as `p5rec serve` has by default, so messages name "my_templates.yaml"; nothing is saved here
    app = create_app(P5Rec.from_run(run), run_info(run), studio=Studio.for_run(run, save_dir="."))
    with ServerThread(app) as server, Browser.launch(width=1440, height=900) as browser:
        browser.navigate(f"{server.url}/studio/")
        browser.evaluate("waitFor(() => document.querySelector('#template-list [data-id]'))")
        browser.evaluate(f"""(async () => {{
            document.querySelector('#template-list [data-id="{args.template}"]').click();
            await waitFor(() => document.querySelectorAll('#rows[data-template="{args.template}"] tr.row').length,
                          20000, 'rows');
            return true; }})()""")
        browser.screenshot(args.out / "studio.png")
        browser.evaluate(f"""(async () => {{
            document.getElementById('tab-write').click();
            const ed = document.getElementById('editor');
            ed.value = {json.dumps(BROKEN)};
            ed.dispatchEvent(new Event('input'));
            await waitFor(() => document.querySelector('#problems li'), 20000, 'a problem');
            return true; }})()""")
        browser.screenshot(args.out / "studio-write.png")
    print(f"wrote {args.out / 'studio.png'} and {args.out / 'studio-write.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
