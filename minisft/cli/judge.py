"""`minisft judge`: score a responses file 0-100 with a judge model served by Ollama (see minisft.judge)."""
import sys
from pathlib import Path

from ..errors import MinisftError
from ..files import write_json
from ..judge import DEFAULT_URL, check_server, judge_responses, load_responses


def run(args) -> int:
    entries = load_responses(args.responses)
    out = Path(args.out) if args.out else Path(args.responses).with_name(Path(args.responses).stem + "-scores.json")
    if not out.parent.is_dir():
        raise MinisftError(f"--out {out}: the folder {out.parent} does not exist")
    url = args.url.rstrip("/")
    check_server(url, args.model)
    results, junk, failure = judge_responses(entries, args.model, url)
    write_json(out, results)

    scores = [r["score"] for r in results if r["score"] is not None]
    unparsed = [r for r in results if r["score"] is None]
    if junk:
        print(f"skipped {junk} lines of the server's replies that were not JSON")
    if unparsed:
        print(f"{len(unparsed)} replies had no score in [0, 100]:")
        for r in unparsed:
            print(f"  entry {r['index']}: {r['reply'][:120]!r}")
    print(f"Number of scores: {len(scores)} of {len(entries)}")
    print(f"Average score: {sum(scores) / len(scores):.2f}" if scores else "Average score: n/a (no scores)")
    print(f"per-entry scores written to {out}")
    if failure:
        print(f"minisft: error: the server failed at {failure}; the {len(results)} entries before it are "
              f"scored and saved in {out}", file=sys.stderr)
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
    p.set_defaults(func=run)
