"""How long `crackscan run --source synthetic:0.2` and then `crackscan runs` on its database
take, end to end as a user waits, for two checkouts taking turns (6 rounds, median).

    python docs/results/2026-12-07-command-end.py BEFORE_CHECKOUT AFTER_CHECKOUT
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

trees = {"before": sys.argv[1], "after": sys.argv[2]}
times = {name: {"run": [], "runs": []} for name in trees}
with tempfile.TemporaryDirectory() as folder:
    for round_ in range(6):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            db = f"sqlite:///{folder}/{name}-{round_}.db"
            for command, args in (("run", ["--source", "synthetic:0.2"]), ("runs", [])):
                start = time.monotonic()
                subprocess.run([sys.executable, "-m", "crackscan", command, *args, "--db", db],
                               env=env, capture_output=True, check=True)
                times[name][command].append(time.monotonic() - start)
for name, commands in times.items():
    for command, seconds in commands.items():
        print(f"{name} {command}: median {statistics.median(seconds):.2f} s "
              f"({', '.join(f'{s:.2f}' for s in seconds)})")
