import sys, tempfile, os, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from pathlib import Path
from bench.handler import start_lastlogin, drive, make_client, checkout
from app.db.migrate import upgrade
d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp")); os.chmod(d, 0o755)
client = make_client("c", d)
def ut(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
base = sys.argv[1] if len(sys.argv) > 1 else None
dms = {}
for name, code in (("now", None), ("base", checkout(base, d) if base else None)):
    if name == "base" and not base: continue
    u = f"sqlite:///{d/(name + '.db')}"; upgrade(u)
    dms[name] = (start_lastlogin(u, d, name=name, code_dir=code), u)
res = {k: [] for k in dms}
for rnd in range(4):
    for name, (dm, u) in dms.items():
        a = ut(dm.proc.pid)
        r = drive(dm.sock("imap"), "x", 1, 4.0, None, f"x{rnd}-", client)
        res[name].append((ut(dm.proc.pid) - a) / r.logins * 1e3)
for k, v in res.items():
    print(k, "sqlite c=1 CPU/login median %.3f ms" % statistics.median(v), [round(x, 3) for x in v])
for dm, u in dms.values(): dm.stop()
