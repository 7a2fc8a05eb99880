"""What the demo users' side networks do to the backbone's answers, through a running demo's API.

    spa demo &                # or make demo; then, once the page answers:
    python benchmarks/demo_users.py [--url http://127.0.0.1:7860/] [--tokens 48]
    python benchmarks/demo_users.py --table     # the README table from the results file

Each demo user's three example prompts, greedy `spa` over the `datacenter` profile at the
calibrated threshold, with the page's default repetition controls and — for comparison — without
them; `base` answers the same prompts first. Per answer: tokens the device shaped, distinct-2
(unique word bigrams / bigrams) and repeated word 4-grams (occurrences of a 4-gram seen earlier
in the answer). Writes `benchmarks/results/demo_users.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.demo_users import DEMO_USERS
from app.devices import DemoDecoding
from benchmarks import harness
from benchmarks.harness import write_results

RESULTS = Path(__file__).parent / "results" / "demo_users.json"


def words(text: str) -> list[str]:
    return re.findall(r"[\w'’-]+", text.lower())


def repeated_ngrams(text: str, n: int = 4) -> int:
    """Occurrences of a word n-gram that already occurred earlier in `text`."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(grams) - len(set(grams))


def distinct(text: str, n: int = 2) -> float:
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer(client, user: str, prompt: str, setting: str, tokens: int, controls: DemoDecoding):
    """One greedy answer through the page's API, with its measures."""
    out = client.predict(
        user,
        prompt,
        setting,
        "greedy",
        "datacenter",
        True,
        0.5,
        tokens,
        0,
        4,
        "pull",
        controls.repetition_penalty,
        controls.no_repeat_ngram_size,
        api_name="/generate",
    )
    pieces = out[-1]["personalised"]
    text = "".join(p["text"] for p in pieces)
    device = sum(p["branch"] == "device" for p in pieces)
    return {
        "user": user if setting != "base" else "base",
        "prompt": prompt,
        "controls": controls.repetition_penalty != 1.0 or controls.no_repeat_ngram_size > 0,
        "tokens": len(pieces),
        "device_tokens": device,
        "device_share": device / max(len(pieces), 1),
        "distinct_2": distinct(text),
        "repeated_4grams": repeated_ngrams(text),
        "answer": text,
    }


def run(url: str, tokens: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    on, off = DemoDecoding(), DemoDecoding(repetition_penalty=1.0, no_repeat_ngram_size=0)
    rows = []
    prompts = dict.fromkeys(p for u in DEMO_USERS for p in u.prompts)
    for prompt in prompts:  # base ignores the user's device
        rows.append(answer(client, DEMO_USERS[0].key, prompt, "base", tokens, on))
        print(f"base: {prompt}", flush=True)
    for controls in (on, off):
        for user in DEMO_USERS:
            for prompt in user.prompts:
                rows.append(answer(client, user.key, prompt, "spa", tokens, controls))
                r = rows[-1]
                print(
                    f"{user.key} ({'controls' if r['controls'] else 'no controls'}): "
                    f"{r['device_tokens']}/{r['tokens']} device, {r['repeated_4grams']} repeated "
                    f"4-grams: {r['answer']!r}",
                    flush=True,
                )
    spa = [r for r in rows if r["user"] != "base" and r["controls"]]
    return {
        "config": {
            "url": url,
            "max_new_tokens": tokens,
            "decoding": "greedy",
            "profile": "datacenter",
            "controls": vars(on),
        },
        "summary": {
            "answers": len(spa),
            "repeated_4grams": sum(r["repeated_4grams"] for r in spa),
            "min_device_share": min(r["device_share"] for r in spa),
        },
        "answers": rows,
    }


def table(results: dict) -> str:
    c = results["config"]["controls"]
    lines = [
        f"Repetition controls: penalty {c['repetition_penalty']}, no-repeat n-gram "
        f"{c['no_repeat_ngram_size']} (the page's defaults) unless marked *off*.",
        "",
        "| user | prompt | controls | device tokens | distinct-2 | repeated 4-grams | answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["answers"]:
        lines.append(
            f"| {r['user']} | {r['prompt']} | {'on' if r['controls'] else '*off*'} | "
            f"{r['device_tokens']} / {r['tokens']} | {r['distinct_2']:.2f} | "
            f"{r['repeated_4grams']} | {json.dumps(r['answer'], ensure_ascii=False)} |"
        )
    s = results["summary"]
    lines += [
        "",
        f"With the controls: {s['repeated_4grams']} repeated 4-grams in {s['answers']} answers; "
        f"the device shaped at least {100 * s['min_device_share']:.0f} % of every answer's tokens.",
        f"Hardware: {results['hardware']}; {results['date']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__, data=False, backbone=False)
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--table", action="store_true", help="print the README table and stop")
    args = parser.parse_args()
    if not args.table:
        write_results(run(args.url, args.tokens), RESULTS)
    print(table(json.loads(RESULTS.read_text())))


if __name__ == "__main__":
    main()
