"""The data of issue 28's vocabulary x repetition grid (docs/results.md section 9): two texts, each as
characters and as GPT-2 tokens, each read about once, 1.5 times or 6 times in a run of 768,000 characters.

  python docs/grid_data.py <the Gutenberg books' folder, with train/ and val/>

Texts: the shipped Tiny Shakespeare (1,003,854 training characters: a run reads 0.77 of it), and the first
3,000,000 characters of the Gutenberg training books in file order (a run reads 0.26 of it), validated on
the first 300,000 characters of the validation books. The repeated data is the first 512,000 (1.5 epochs)
or 128,000 (6 epochs) characters of the training text, or as many GPT-2 tokens as that text has on average
(the .bin cut, so the vocabulary and the validation text stay those of the whole). Out: data/grid/<cell>.
"""

import json
import os
import shutil
import subprocess
import sys

RUN_CHARS = 768_000  # the text one run reads (1,000 steps of 768 characters)
REPEATS = {"x1.5": 1.5, "x6": 6}


def prepare(args):
    subprocess.run([sys.executable, "prepare_data.py", *args], check=True)


def gutenberg_text(folder, n):
    """The first n characters of the books in folder (file order), a blank line between books."""
    parts, size = [], 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            parts.append(f.read().strip() + "\n\n")
        size += len(parts[-1])
        if size >= n:
            break
    return "".join(parts)[:n]


def cut(src, dst, unique_chars):
    """dst: src with its train.bin cut to the ids of the first unique_chars characters (on average)."""
    with open(os.path.join(src, "meta.json")) as f:
        meta = json.load(f)
    os.makedirs(dst, exist_ok=True)
    ids = round(unique_chars * meta["train_tokens"] / meta["train_chars"])
    with open(os.path.join(src, "train.bin"), "rb") as f, open(os.path.join(dst, "train.bin"), "wb") as g:
        g.write(f.read(2 * ids))
    shutil.copy(os.path.join(src, "val.bin"), dst)
    meta.update(train_tokens=ids, train_chars=unique_chars, cut_from=src)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def main(gutenberg):
    os.makedirs("data/grid", exist_ok=True)
    train = gutenberg_text(os.path.join(gutenberg, "train"), 3_000_000)
    val = gutenberg_text(os.path.join(gutenberg, "val"), 300_000)
    known = set(train)
    dropped = sum(c not in known for c in val)
    val = "".join(c for c in val if c in known)  # --chars refuses a character it cannot encode
    print(f"gutenberg: {len(train):,} training characters; {dropped} validation characters dropped")
    for name, text in (("gutenberg_train.txt", train), ("gutenberg_val.txt", val)):
        with open(f"data/grid/{name}", "w", encoding="utf-8") as f:
            f.write(text)
    sources = {
        "ts": ["--dataset", "tinyshakespeare"],
        "gut": ["--input", "data/grid/gutenberg_train.txt", "--val_input", "data/grid/gutenberg_val.txt"],
    }
    for text, args in sources.items():
        train_chars = None  # the characters' ids count them
        for vocab, extra in (("chars", ["--chars"]), ("gpt2", [])):
            whole = f"data/grid/{text}_{vocab}_x1"
            if not os.path.exists(os.path.join(whole, "meta.json")):
                prepare([*args, *extra, "--out_dir", whole])
            with open(os.path.join(whole, "meta.json")) as f:
                meta = json.load(f)
            train_chars = train_chars or meta["train_tokens"]
            meta["train_chars"] = train_chars
            with open(os.path.join(whole, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
            for rep, times in REPEATS.items():
                cut(whole, f"data/grid/{text}_{vocab}_{rep}", round(RUN_CHARS / times))
            ratio = train_chars / meta["train_tokens"]
            print(f"{whole}: {meta['train_tokens']:,} ids, {ratio:.2f} characters each")


if __name__ == "__main__":
    main(sys.argv[1])
