#!/usr/bin/env python3
"""Prints the held-out digits, samples 1000..1796 of `sklearn.datasets.load_digits`, one JSON line
each: {"pixels": [64 integers 0..16, row by row], "label": k}.

train.py never trains on these. Each line is a request the guest accepts as it is (the guest reads
`pixels` and ignores `label`), so a server-side accuracy check can post the lines one by one and
compare each answer's `class` with the line's `label`:

    python3 holdout.py > /tmp/holdout.jsonl
    python3 holdout.py | head -1 | curl -s -X POST localhost:8080/functions/$ID/invoke -d @-

Needs scikit-learn (the data ships inside it; nothing is downloaded).
"""

import json

from sklearn.datasets import load_digits

FIRST = 1000  # train.py trains on samples 0..999


def main():
    digits = load_digits()
    for pixels, label in zip(digits.data[FIRST:], digits.target[FIRST:]):
        print(json.dumps({"pixels": [int(p) for p in pixels], "label": int(label)}, separators=(",", ":")))


if __name__ == "__main__":
    main()
