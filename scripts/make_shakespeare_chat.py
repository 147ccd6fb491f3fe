"""Tiny Shakespeare as GLM-4 conversations: each speech is a turn; one speaker's speech is the user turn and the
next speaker's reply the assistant turn. Consecutive speeches form multi-turn conversations, written twice, once
starting with the user on even speeches and once on odd ones, so that every speech is an assistant turn once.
The last 10% of the text (cut at a speech boundary) is held out for validation.

    python scripts/make_shakespeare_chat.py data/tinyshakespeare.txt data/shakespeare_chat
"""

import json
import os
import sys


def speeches(text: str) -> list[str]:
    """The speeches, without the speaker names ("ROMEO:" lines)."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append("\n".join(lines[1:]).strip())
    return out


def conversations(turns: list[str], max_chars: int = 700) -> list[dict]:
    rows = []
    for offset in (0, 1):
        current: list[str] = []
        size = 0
        for turn in turns[offset:]:
            if current and size + len(turn) > max_chars and len(current) % 2 == 0:
                rows.append(current)
                current, size = [], 0
            current.append(turn)
            size += len(turn)
        if len(current) >= 2:
            rows.append(current[: len(current) // 2 * 2])
    return [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(c)]}
            for c in rows]


def main(src: str, out_dir: str) -> None:
    with open(src, encoding="utf-8") as f:
        text = f.read()
    cut = text.rfind("\n\n", 0, int(len(text) * 0.9)) + 2  # the last 10%, from a speech boundary
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (("train", text[:cut]), ("val", text[cut:])):
        rows = conversations(speeches(part))
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} conversations from {len(part):,} characters")


if __name__ == "__main__":
    main(*sys.argv[1:3])
