"""``python -m metazoo``: print the table of every registered model (params, GMACs, features)."""
from __future__ import annotations

import argparse
import fnmatch

import timm

from .zoo import format_table, table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m metazoo", description=__doc__)
    ap.add_argument("pattern", nargs="?", default="mz_*", help="fnmatch pattern over model names (default mz_*)")
    args = ap.parse_args(argv)
    names = [n for n in timm.list_models("mz_*") if fnmatch.fnmatch(n, args.pattern)]
    if not names:
        raise SystemExit(f"pattern={args.pattern!r} matches no registered model; try 'mz_*'")
    print(format_table(table(sorted(names))))


if __name__ == "__main__":
    main()
