#!/usr/bin/env python3
"""N concurrent clients against `sluice serve` (each max_tokens 8): status
codes, times, and the server's /metrics afterwards.
Usage: serve-load.py http://127.0.0.1:8089 32"""
import json, sys, time, threading, urllib.request, urllib.error
base = sys.argv[1]; n = int(sys.argv[2])
res = [None]*n
def one(i):
    body = json.dumps({"messages": [{"role": "user", "content": f"Question {i}: why is the sky blue?"}], "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            j = json.load(r); res[i] = (r.status, time.time() - t, j["usage"]["completion_tokens"])
    except urllib.error.HTTPError as e:
        res[i] = (e.code, time.time() - t, 0)
    except Exception as e:
        res[i] = ("exc " + str(e), time.time() - t, 0)
t0 = time.time()
ths = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ths]; [t.join() for t in ths]
codes = {}
for r in res: codes[r[0]] = codes.get(r[0], 0) + 1
print("codes", codes, "wall %.1f s" % (time.time() - t0), "slowest 200 %.1f s" % max([r[1] for r in res if r[0] == 200] or [0]), "slowest 503 %.2f s" % max([r[1] for r in res if r[0] == 503] or [0]))
m = urllib.request.urlopen(base + "/metrics").read().decode()
for l in m.splitlines():
    if l.startswith("sluice_") and any(k in l for k in ["requests", "resident", "ram_cap", "hit_rate", "completion_tokens", "reused"]):
        print(l)
