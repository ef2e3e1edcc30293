#!/usr/bin/env python3
"""An experiment for perf/HOSTILE.md ("Compile child priority"): what a deploy's compile would
cost a bystander if the compile child ran at a lower priority. Usage:

    target/release/tensor-wasm-bench --scenario hostile --attacks deploy-flood ... &
    perf/renice-compiles.py $!

It gives nice 10 to every child of the servers the harness (the pid given) started, that is to
each `tensor-wasm compile-guest`, within 10 ms of its start, until the harness exits. It polls
/proc rather than running ps, so that the poll itself takes next to no CPU from what is measured.
"""
import os
import sys
import time

NICE = 10
POLL_S = 0.01


def children(pid):
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def main():
    harness = int(sys.argv[1])
    reniced = set()
    while os.path.exists(f"/proc/{harness}"):
        for server in children(harness):
            for child in children(server):
                if child not in reniced:
                    try:
                        os.setpriority(os.PRIO_PROCESS, child, NICE)
                        reniced.add(child)
                    except OSError:
                        pass  # gone already
        time.sleep(POLL_S)
    print(f"reniced {len(reniced)} compile children", file=sys.stderr)


if __name__ == "__main__":
    main()
