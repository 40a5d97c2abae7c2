import sys, tempfile, os
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from pathlib import Path
from bench.handler import start_lastlogin, database, drive, make_client
d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp")); os.chmod(d, 0o755)
url, server = database()
client = make_client("c", d)
def ut(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) / os.sysconf("SC_CLK_TCK"), int(f[12]) / os.sysconf("SC_CLK_TCK")
for name, u in (("pg", url), ("sqlite", f"sqlite:///{d/'x.db'}")):
    if name == "sqlite":
        from app.db.migrate import upgrade; upgrade(u)
    dm = start_lastlogin(u, d, name=name)
    drive(dm.sock("imap"), "w", 1, 1.0, None, "w-", client)
    for c in (1, 64):
        a = ut(dm.proc.pid)
        r = drive(dm.sock("imap"), "x", c, 5.0, None, f"x{c}-", client)
        b = ut(dm.proc.pid)
        print(f"{name} c={c}: {r.logins} logins user {(b[0]-a[0])/r.logins*1e3:.3f} ms sys {(b[1]-a[1])/r.logins*1e3:.3f} ms per login")
    dm.stop()
if server: server.stop()
