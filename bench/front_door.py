"""How a bad config or input meets the user: exit code, stderr lines, seconds, and whether anything was
created, for each case of the front-door tests, run as a user runs them (a fresh `lmlm` process).

    .venv/bin/python bench/front_door.py [--project DIR]    # DIR: another checkout to compare (default: this one)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "unknown field (wrokdir)": "wrokdir: out/x\n",
    "three mistakes": "wrokdir: out/x\ningest_workers: 0\nseed:\n  sample_doc: 5\n",
    "malformed YAML": "workdir: out\n  corpus: [a\n",
    "missing corpus": "corpus: [nope/data]\nworkdir: out\n",
    "unknown annotator backend": "workdir: out\nseed: {annotator: {backend: spacy}}\n",
    "unreachable endpoint": "workdir: out\nseed:\n  annotator:\n    backend: openai\n    endpoint: "
                            "{base_url: 'http://127.0.0.1:9/v1', api_key_env: ''}\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": args.project}
    print(f"{'case':28s} {'exit':>4s} {'stderr lines':>12s} {'seconds':>8s}  created")
    for name, config in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "run.yaml").write_text(config)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "run.yaml"], cwd=tmp, env=env,
                               capture_output=True, text=True, timeout=600)
            seconds = time.perf_counter() - t0
            created = sorted(p.name for p in Path(tmp).iterdir() if p.name != "run.yaml")
            print(f"{name:28s} {r.returncode:4d} {len(r.stderr.strip().splitlines()):12d} {seconds:8.2f}  "
                  f"{', '.join(created) or '-'}")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
