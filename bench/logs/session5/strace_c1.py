import sys, subprocess, tempfile, os, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from pathlib import Path
from bench.handler import start_lastlogin, database, drive
d = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp")); os.chmod(d, 0o755)
url, server = database()
dm = start_lastlogin(url, d, log_level=sys.argv[1] if len(sys.argv) > 1 else "warning")
path = str(d / "ll" / "imap.sock")
print(os.listdir(d / "ll"))
drive(path, "x", 1, None, 300, "warm")
st = subprocess.Popen(["strace", "-c", "-f", "-p", str(dm.proc.pid), "-o", "/tmp/lastlogin-strace.out"])
time.sleep(1)
drive(path, "x", 1, None, 1000, "st")
time.sleep(0.5)
st.send_signal(2); st.wait()
dm.stop()
if server: server.stop()
print(open("/tmp/lastlogin-strace.out").read())
