"""Write data/raw/pyqa.jsonl, the embedded default dataset (seeded: same bytes every run).

python scripts/make_pyqa.py [--rows 3000] [--seed 0] [--out data/raw/pyqa.jsonl]
"""

import argparse
import json
from pathlib import Path

from lorapipe.pyqa import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/raw/pyqa.jsonl"))
    args = parser.parse_args()
    rows = generate(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
