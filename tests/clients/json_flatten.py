#!/usr/bin/python3
"""Flatten JSON from stdin into `path<TAB>value` lines for the Rust tests.

Objects and arrays become dotted paths (`exports.0.export-size`); strings are
printed raw, other scalars as JSON (`true`, `false`, `null`, numbers).
"""
import json
import sys


def walk(prefix, v, out):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif isinstance(v, list):
        out.append((prefix + ".len" if prefix else "len", str(len(v))))
        for i, x in enumerate(v):
            walk(f"{prefix}.{i}" if prefix else str(i), x, out)
    elif isinstance(v, str):
        out.append((prefix, v.replace("\t", " ").replace("\n", " ")))
    else:
        out.append((prefix, json.dumps(v)))


def main():
    text = sys.stdin.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        sys.exit(f"invalid JSON: {e}")
    out = []
    walk("", data, out)
    for k, v in out:
        print(f"{k}\t{v}")


if __name__ == "__main__":
    main()
