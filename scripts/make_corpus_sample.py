"""Build the statistics corpus packaged with memit (src/memit/data/) from the Wikipedia
sample beside the project: the first articles in file order, each text cut to its first
characters (key statistics read only a sample's first `mom2_max_tokens` tokens), with the
article's id, url and title kept for attribution (CC BY-SA 3.0).

    python scripts/make_corpus_sample.py ../shared/data/wikipedia_en_2015_sample.jsonl.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "memit" / "data" / "wikipedia_en_2015_sample2000.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--articles", type=int, default=2000, help="The default preset's mom2_n_samples.")
    # 256 tokens (the default preset's mom2_max_tokens) x 16 characters: the prefix the
    # statistics tokenise, so these texts give the same statistics as the whole articles.
    parser.add_argument("--chars", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with gzip.open(args.source, "rt", encoding="utf-8") as src:
        records = [json.loads(line) for line, _ in zip(src, range(args.articles))]
    # mtime=0: the same input gives the same bytes.
    with gzip.GzipFile(args.out, "wb", mtime=0) as raw:
        for record in records:
            kept = {key: record[key] for key in ("id", "url", "title")}
            line = json.dumps({**kept, "text": record["text"][: args.chars]}, ensure_ascii=False)
            raw.write((line + "\n").encode("utf-8"))
    print(f"{args.out}: {len(records)} articles, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
