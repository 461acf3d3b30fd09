"""A tool whose memory grows with its input, as aligners and assemblers do: it allocates (and
touches) `--base` MB plus `--per-mb` MB for each MB of its input file, holds it `--hold`
seconds, and writes how much it took to stdout.

    python sized_tool.py INPUT [--base MB] [--per-mb MB] [--hold SECONDS]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--base", type=float, default=10.0)
    parser.add_argument("--per-mb", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=0.2)
    args = parser.parse_args()
    need = args.base + os.path.getsize(args.input) / 2**20 * args.per_mb
    block = bytearray(int(need * 2**20))  # zero-filled: every page touched
    time.sleep(args.hold)
    print(f"{len(block) // 2**20} MB")


if __name__ == "__main__":
    main()
