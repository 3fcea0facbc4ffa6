"""Run a command and report the longest stretch without output: a user watching `bin/demo` should never
wait more than 30 s without a word. Output is read byte by byte (tqdm's carriage-return updates count).

  python benchmarks/output_gaps.py --limit=30 -- bin/demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def watch(cmd: list[str], limit: float, log_path: str | None) -> dict:
    """Stream the command's stdout+stderr through, timing the gaps between chunks of output."""
    start = last = time.monotonic()
    gaps: list[tuple[float, float, str]] = []  # (gap seconds, at seconds, text after the gap)
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    while True:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        now = time.monotonic()
        text = chunk.decode(errors="replace")
        gaps.append((now - last, now - start, text.strip().splitlines()[0][:100] if text.strip() else ""))
        last = now
        sys.stdout.write(text)
        sys.stdout.flush()
        if log:
            log.write(f"[{now - start:8.1f}s] {text}")
    rc = proc.wait()
    end = time.monotonic()
    gaps.append((end - last, end - start, "(exit)"))
    if log:
        log.close()
    worst = sorted(gaps, reverse=True)[:5]
    return {"command": " ".join(cmd), "exit_code": rc, "wall_s": round(end - start, 1),
            "longest_gap_s": round(worst[0][0], 1), "limit_s": limit, "within_limit": worst[0][0] <= limit,
            "longest": [{"gap_s": round(g, 1), "at_s": round(t, 1), "then": s} for g, t, s in worst]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=float, default=30.0, help="longest acceptable silence in seconds")
    parser.add_argument("--log", default=None, help="also write the output with timestamps here")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    summary = watch(cmd, args.limit, args.log)
    print(json.dumps(summary, indent=2), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    sys.exit(0 if summary["within_limit"] and summary["exit_code"] == 0 else 1)


if __name__ == "__main__":
    main()
