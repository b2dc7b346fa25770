"""cleanvision's blurry / dark / light / low-information flags on an image folder, as JSON (for basics_planted.py's
agreement table). cleanvision is not a winnow dependency: run this with a separate environment that has it, e.g.
    python -m venv /tmp/cv && /tmp/cv/bin/pip install cleanvision==0.3.7
    /tmp/cv/bin/python benchmarks/cleanvision_flags.py /tmp/planted/train /tmp/cleanvision.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    import cleanvision
    from cleanvision import Imagelab

    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    t = time.perf_counter()
    lab = Imagelab(data_path=str(folder))
    lab.find_issues({"blurry": {}, "dark": {}, "light": {}, "low_information": {}})
    issues = lab.issues
    cols = [c for c in issues.columns if c.startswith("is_")]
    flags = {str(Path(p).relative_to(folder)): {c: bool(issues.loc[p, c]) for c in cols} for p in issues.index}
    out.write_text(json.dumps({"version": cleanvision.__version__, "seconds": round(time.perf_counter() - t, 1),
                               "defaults": "cleanvision default thresholds", "flags": flags}))


if __name__ == "__main__":
    main()
