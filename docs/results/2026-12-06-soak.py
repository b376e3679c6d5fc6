"""Soak: one long replay through ``crackscan run``, each stage's resident memory sampled, for
2026-12-06-soak.md. Prints one JSON object: the run's summary, and per stage (acquisition,
management, each worker) its RSS in MiB every SAMPLE_S seconds, with the growth from the
sample at WARMUP_FRACTION of the run to the last.

Run from the repository root:
  .venv/bin/python docs/results/2026-12-06-soak.py SOURCE [WORKERS] > soak.json
e.g. SOURCE synthetic:800 (20,000 frames of 640 x 360 at 25 fps).
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_S = 10.0
WARMUP_FRACTION = 0.1


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stage_of(pid: int) -> str | None:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for stage in (b"acquire", b"manage", b"infer"):
        if stage in words:
            return stage.decode() + ("" if stage != b"infer" else f"-{pid}")
    return None


def main() -> None:
    source = sys.argv[1]
    workers = sys.argv[2] if len(sys.argv) > 2 else "2"
    db = Path(tempfile.mkdtemp(prefix="soak-")) / "soak.db"
    started = time.monotonic()
    run = subprocess.Popen([sys.executable, "-m", "crackscan", "run", "--source", source,
                            "--db", f"sqlite:///{db}", "--workers", workers, "--format",
                            "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: dict[str, list[tuple[float, float]]] = {}
    while run.poll() is None:
        children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True,
                                  text=True).stdout.split()
        for pid in map(int, children):
            stage, rss = stage_of(pid), rss_mib(pid)
            if stage and rss is not None:
                samples.setdefault(stage, []).append((round(time.monotonic() - started, 1),
                                                      round(rss, 1)))
        time.sleep(SAMPLE_S)
    summary = json.loads(run.stdout.read())
    growth = {}
    for stage, series in samples.items():
        after_warmup = series[int(len(series) * WARMUP_FRACTION)][1]
        growth[stage] = {"rss_mib_after_warmup": after_warmup, "rss_mib_last": series[-1][1],
                         "rss_mib_max": max(rss for _, rss in series),
                         "growth_after_warmup": round(series[-1][1] / after_warmup - 1, 4)}
    print(json.dumps({"source": source, "workers": int(workers), "summary": summary,
                      "growth": growth, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
