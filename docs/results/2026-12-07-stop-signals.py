"""SIGTERM at random moments of `crackscan run`'s start-up; counts how each run ended.

    python docs/results/2026-12-07-stop-signals.py RUNS SEED LOW_S HIGH_S

Each run: `crackscan run --source synthetic:200` on a new SQLite file, SIGTERM sent a uniform
LOW_S..HIGH_S seconds after the process started; its exit status, or HANG when it had not ended
30 s later (then it is killed). Set PYTHONPATH to a checkout to measure that code. Run a CPU
burner beside it to see a loaded host's start-up."""

import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

runs, seed, low, high = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
ended = collections.Counter()
for i in range(runs):
    after = rng.uniform(low, high)
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/err", "w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "crackscan", "run", "--source", "synthetic:200", "--db",
                 f"sqlite:///{folder}/x.db", "--format", "json"], stdout=subprocess.DEVNULL,
                stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(after)
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(30)
        except subprocess.TimeoutExpired:
            status = "HANG"
            process.kill()
            process.wait()
            subprocess.run(["pkill", "-f", f"{folder}/x.db"])  # its stages
        ended[status] += 1
        print(i, f"{after:.2f}", status, flush=True)
print(dict(ended))
