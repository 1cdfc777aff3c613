"""The data of issue 35's tokens-per-parameter ladder (docs/results.md section 10): all the Gutenberg
training books as characters, validated on the first 600,000 characters of the validation books.

  python docs/ladder_data.py <the Gutenberg books' folder, with train/ and val/>

The validation text is written to data/ladder_val.txt for prepare_data.py --chars, which drops and counts
the characters that the training text lacks (in the books of section 10 there are none). Out:
data/ladder_chars/.
A run reads windows drawn at random from all of train.bin (about 100M characters), so a run of N << 100M
characters reads about N distinct characters: text read about once.
"""

import os
import subprocess
import sys

VAL_CHARS = 600_000


def books(folder, n):
    """The first n characters of the books in folder (file order), a blank line between books."""
    parts, size = [], 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            parts.append(f.read().strip() + "\n\n")
        size += len(parts[-1])
        if size >= n:
            break
    text = "".join(parts)
    return text[:n]


def main(gutenberg):
    os.makedirs("data", exist_ok=True)
    val = books(os.path.join(gutenberg, "val"), VAL_CHARS)
    with open("data/ladder_val.txt", "w", encoding="utf-8") as f:
        f.write(val)
    if not os.path.exists("data/ladder_chars/meta.json"):
        subprocess.run(
            [
                sys.executable,
                "prepare_data.py",
                "--chars",
                "--input",
                os.path.join(gutenberg, "train"),
                "--val_input",
                "data/ladder_val.txt",
                "--out_dir",
                "data/ladder_chars",
            ],
            check=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
