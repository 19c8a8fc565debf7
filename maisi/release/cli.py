"""The release command line (``python -m maisi.release list|diff|verify``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from maisi.release.inspect import diff_releases, format_diff, list_releases, verify_release

__all__ = ["main"]

def _print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maisi.release", description="List, compare and verify synthetic CT releases.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="the releases under a root folder")
    p_list.add_argument("--root", default="results/releases")
    p_diff = sub.add_parser("diff", help="what differs between two releases (exit 1 when they differ)")
    p_diff.add_argument("a")
    p_diff.add_argument("b")
    p_verify = sub.add_parser("verify", help="re-hash a release's files against its manifest (exit 1 on mismatches)")
    p_verify.add_argument("release")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            rows = list_releases(args.root)
            if not rows:
                print(f"no releases under {args.root}")
                return 0
            shown = [{**r, "content_digest": str(r["content_digest"])[:16]} for r in rows]
            _print_table(shown, ("name", "version", "n_cases", "created_utc", "content_digest"))
            return 0
        if args.command == "diff":
            diff = diff_releases(args.a, args.b)
            sys.stdout.write(format_diff(diff))
            return 0 if diff["identical"] else 1
        problems = verify_release(args.release)
        if problems:
            print(f"{args.release}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"{args.release}: all files match the manifest")
        return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
