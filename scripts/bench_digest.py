"""A few lines per ``seahal bench`` JSON document: how many rows ran, which were wrong, failed or
missed their issue's goal (the full rows stay in the JSON). Used by scripts/gpu_session.sh.

    python scripts/bench_digest.py out/bench-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def digest(path: Path) -> list[str]:
    """The lines describing one bench document (or why it could not be read)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{path.name}: not read ({type(exc).__name__}: {exc})"]
    rows = doc["rows"]
    timed = [r for r in rows if r["us"] is not None]
    wrong = [r for r in rows if r["check"] is not None and not r["check"]["passed"]]
    errors = [r for r in rows if r["check"] is None and r.get("note")]
    goals = [r for r in rows if "goal_met" in r]
    lines = [f"{path.name}: {len(rows)} rows on {doc['device']} (torch {doc['torch']}, triton {doc['triton']}): "
             f"{len(timed)} timed, {len(wrong)} wrong, {len(errors)} not run"
             + (f"; goal met {sum(r['goal_met'] for r in goals)} of {len(goals)}" if goals else "")]
    lines += [f"  wrong: {r['op']} {r['shape']} (err {r['check']['err']:.2e})" for r in wrong]
    lines += [f"  not run: {r['op']} {r['shape']}: {r['note']}" for r in errors]
    lines += [f"  goal missed: {r['op']} {r['shape']}: {r['us']:.1f} us > {r['goal_us']:.1f} us"
              for r in goals if not r["goal_met"]]
    return lines


def main(paths: list[str]) -> int:
    for path in paths:
        print("\n".join(digest(Path(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
