"""`minisft judge`: score a responses file 0-100 with a judge model served by Ollama (see minisft.judge).
The scores file is saved as scoring goes; running the same command again continues where it stopped."""
import sys
from functools import partial
from pathlib import Path

from ..files import write_json
from ..judge import (DEFAULT_TIMEOUT, DEFAULT_URL, check_server, check_timeout, check_url, judge_responses,
                     load_responses, load_scores)
from .checks import output_file


def run(args) -> int:
    timeout = check_timeout(args.timeout)
    url = check_url(args.url)
    entries = load_responses(args.responses)
    out = Path(args.out) if args.out else Path(args.responses).with_name(Path(args.responses).stem + "-scores.json")
    output_file(out)
    done = load_scores(out, entries, args.model)
    check_server(url, args.model)
    if done:
        print(f"continuing {out}: {len(done)} of {len(entries)} entries are scored already")
    try:
        results, junk, failure = judge_responses(entries, args.model, url, timeout=timeout, done=done,
                                                 save=partial(write_json, out))
    except KeyboardInterrupt:
        print(f"minisft: the scores so far are saved in {out}; run the same command again to continue",
              file=sys.stderr)
        raise

    scores = [r["score"] for r in results if r["score"] is not None]
    unparsed = [r for r in results if r["score"] is None and "error" not in r]
    broken = [r for r in results if "error" in r]
    if junk:
        print(f"skipped {junk} lines of the server's replies that were not JSON")
    if unparsed:
        print(f"{len(unparsed)} replies had no score in [0, 100]:")
        for r in unparsed:
            print(f"  entry {r['index']}: {r['reply'][:120]!r}")
    if broken:
        print(f"{len(broken)} replies had a shape no Ollama server sends (tried again on the next run):")
        for r in broken:
            print(f"  entry {r['index']}: {r['error']}")
    print(f"Number of scores: {len(scores)} of {len(entries)}")
    print(f"Average score: {sum(scores) / len(scores):.2f}" if scores else "Average score: n/a (no scores)")
    print(f"per-entry scores written to {out}")
    if failure:
        print(f"minisft: error: the server failed at {failure}; the {len(results)} entries scored are saved in "
              f"{out}; run the same command again to continue", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("judge", help="score model responses 0-100 with a local Ollama model (the book's judge)",
                       description=__doc__)
    p.add_argument("--responses", required=True,
                   help="JSON list of entries with instruction, input, output and model_response")
    p.add_argument("--url", default=DEFAULT_URL, help="the Ollama server")
    p.add_argument("--model", default="llama3", help="the judging model")
    p.add_argument("--out", default=None, help="per-entry scores (JSON); default RESPONSES-scores.json beside it")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait to connect, and for the whole of each reply (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=run)
