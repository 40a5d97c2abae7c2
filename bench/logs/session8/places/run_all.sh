#!/bin/sh
# from /work/notes/places; the real runs (after the test suite ended)
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/work/main
PY=/work/main/.venv/bin/python
$PY bench.py 5 1000 300 > bench.out 2>&1
$PY heavy.py 5 200 > heavy.out 2>&1
$PY bench.py 5 1000 300 hist=20000 > bench-h20000.out 2>&1   # added after bench.out (04:29)
$PY explain.py > explain.out 2>&1   # run at 04:28, before bench-h20000
$PY bench.py 5 1000 300 > bench-rep.out 2>&1   # replicate of bench.out (04:34)
