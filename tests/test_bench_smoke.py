"""The handler benchmark, as a smoke test: it runs, and every login is stored once.

No timing is asserted here; speed is measured by `python -m bench.handler`.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_handler_benchmark_smoke(pg_cluster):
    url = pg_cluster.create_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(LASTLOGIN_BENCH_DATABASE_URL=url, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "bench.handler", "--smoke"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every lastlogin login stored once" in out.stdout


def test_geoip_benchmark_smoke():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "bench.geoip", "--smoke"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "geoip benchmark ran" in out.stdout
