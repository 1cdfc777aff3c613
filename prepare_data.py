"""Turn text into train.bin, val.bin (GPT-2 token ids as raw uint16) and meta.json for patchgpt.py.
With --chars the ids are characters instead (nanoGPT's shakespeare_char): the vocabulary is every character
of the training text, in code point order, saved in meta.json; documents follow each other with no
end-of-text mark, and a character of the validation text that the training text lacks is dropped (meta.json
counts them as val_dropped): a model has no id for it, and the same val.bin serves every run.

--input: a .txt file, a folder of .txt files (recursive, sorted) or a .jsonl file with a "text" string per
line. Each file and each record is a document, followed by the end-of-text token (a literal <|endoftext|>
in the text is that token too). Without --val_input, val.bin gets the input's bytes after the first
int(total * (1 - val_frac)); a .txt file is cut there (at a character's start), a record goes where it starts.
"""

import argparse
import collections
import errno
import functools
import gzip
import hashlib
import http.client
import json
import os
import re
import shlex
import sys
import tempfile
import time
import urllib.request

import numpy as np
import tiktoken

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"  # of GPT-2's encoder.json
# GPT-2 cuts text into these pieces before BPE, so text cut where it always cuts (after "\n" in "word\nword",
# before " " in "word word"; not in runs of whitespace) encodes, piece by piece, to the tokens of the whole
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
EOT = "<|endoftext|>"
CHUNK_CHARS = 1 << 20  # characters read at a time; a batch has this many per tokenizer thread
OUTPUTS = ("train.bin", "val.bin", "meta.json")


class PrepareError(Exception):
    """Bad input or refused output: main() prints it as one line and exits with code 2."""


def list_files(path):
    """The files behind an --input path: the file, or a folder's .txt files."""
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file or directory")
    files = [path] if os.path.isfile(path) else []
    for root, _, names in os.walk(path):  # nothing for a file
        files += [os.path.join(root, name) for name in names if name.endswith(".txt")]
    if sum(os.path.getsize(f) for f in files) == 0:
        raise PrepareError(f"{path}: no text (an empty file, or a folder without non-empty .txt files)")
    return sorted(files, key=lambda f: f.split(os.sep))  # os.walk's order depends on the filesystem


def read_txt(path, split_at):
    """Yield (split, text, n_bytes) for a .txt file in pieces of about CHUNK_CHARS; <|endoftext|> ends it."""
    with open(path, encoding="utf-8", newline="") as f:
        offset, text = 0, f.read(CHUNK_CHARS)
        while text:
            more = f.read(CHUNK_CHARS)
            cuts = [m.start() for m in SAFE_CUT.finditer(text, max(0, len(text) - 65536))] if more else []
            cut = cuts[-1] if cuts else len(text)  # none in the last 64K characters: not prose, cut anywhere
            piece, text = text[:cut], text[cut:] + more
            n_bytes = len(piece.encode())
            if offset < split_at < offset + n_bytes:  # the split: cut at its byte, into whole characters
                head = piece.encode()[: split_at - offset].decode(errors="ignore")
                marker = piece.find(EOT, max(0, len(head) - len(EOT) + 1), len(head) + len(EOT) - 1)
                head = head if marker == -1 else head[:marker]  # a marker cut in two would be just text
                yield "train", head, 0
                piece = piece[len(head) :]
            split = "train" if offset + n_bytes <= split_at else "val"
            yield split, piece if more else piece + EOT, n_bytes
            offset += n_bytes


def read_jsonl(path, split_at):
    """Yield (split, text + <|endoftext|>, n_bytes) for each record of a .jsonl file."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            split = "train" if offset < split_at else "val"  # a record goes where it starts
            offset += len(line)
            try:
                record = json.loads(line) if line.strip() else {"text": ""}
            except ValueError as e:  # not JSON, or not UTF-8
                raise PrepareError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PrepareError(f'{path}:{lineno}: no "text" string')
            if record["text"]:  # an empty document (or line) is no document
                yield split, record["text"] + EOT, len(line)


def batches(files, split_at, n_chars):
    """Lists of (split, text, n_bytes) pieces of about n_chars; split_at counts all files' bytes in turn."""
    batch, size = [], 0
    for path in files:
        try:
            for piece in (read_jsonl if path.endswith(".jsonl") else read_txt)(path, split_at):
                batch.append(piece)
                size += len(piece[1])
                if size >= n_chars:
                    yield batch
                    batch, size = [], 0
        except UnicodeDecodeError:
            raise PrepareError(f"{path}: not valid UTF-8") from None
        split_at -= os.path.getsize(path)
    yield batch


@functools.lru_cache(maxsize=None)
def get_encoding():
    """GPT-2's tokenizer (a tiktoken Encoding), built from the copy of its encoder.json in assets/."""
    path = os.path.join(ASSETS, "gpt2_encoder.json.gz")
    if not os.path.exists(path):  # e.g. this script was copied away: tiktoken's own, cached or downloaded
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network, no requests package, ...
            raise PrepareError(f"no gpt2 tokenizer: restore {ASSETS} or go online ({e})") from None
    with gzip.open(path) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != ENCODER_SHA256:
        raise PrepareError(f"{path} is not GPT-2's encoder.json: restore it from the patchgpt repository")
    # encoder.json spells each byte as a character: a printable one as itself, the n-th other as chr(256 + n)
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    encoder = json.loads(data)
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != EOT}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def char_ids(chars, text):
    """The ids of text's characters in chars (a vocabulary sorted by code point), as uint16, without the
    characters that chars lacks; and those characters, in text's order."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
    ids = np.minimum(np.searchsorted(vocab, codes), len(vocab) - 1)
    known = vocab[ids] == codes
    return ids[known].astype(np.uint16), [text[i] for i in np.flatnonzero(~known)]


def write(f, data):
    """f.write(data); a full disk becomes one line that names the file."""
    try:
        f.write(data)
        f.flush()  # so that a full disk shows here, not later in close()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        f.raw.close()  # drops what is still buffered: closing f would only fail the same way again
        raise PrepareError(f"disk full: no space left for {f.name}; free some space and rerun") from None


def prepare(
    input_path, out_dir, val_input=None, val_frac=0.1, force=False, workers=1, source=None, chars=False
):
    """Write out_dir/{train,val}.bin, meta.json; on any failure (Ctrl-C too) the old ones stay as they are."""
    files = list_files(input_path)
    n_bytes = sum(os.path.getsize(f) for f in files)
    split_at = n_bytes if val_input else int(n_bytes * (1 - val_frac))  # val_input: all of it is val
    files += list_files(val_input) if val_input else []
    if not force and any(os.path.exists(os.path.join(out_dir, name)) for name in OUTPUTS):
        raise PrepareError(f"{out_dir} has outputs already (pass --force to overwrite them)")
    if chars:  # a first pass for the vocabulary: the characters of the training text alone
        seen = set()
        for batch in batches(files, split_at, CHUNK_CHARS):
            seen.update(*(text.replace(EOT, "") for split, text, _ in batch if split == "train"))
        vocab = "".join(sorted(seen))
        if len(vocab) > 2**16:
            raise PrepareError(f"{input_path}: {len(vocab):,} distinct characters, more than uint16 ids hold")
    else:
        enc = get_encoding()
    total_mb = sum(os.path.getsize(f) for f in files) / 1e6
    os.makedirs(out_dir, exist_ok=True)
    tmp = {name: os.path.join(out_dir, name + ".tmp") for name in OUTPUTS}
    try:
        with open(tmp["train.bin"], "wb") as train, open(tmp["val.bin"], "wb") as val:
            out, done, shown = {"train": train, "val": val}, 0, time.time()
            dropped = collections.Counter()  # the validation text's characters that the vocabulary lacks
            for batch in batches(files, split_at, workers * CHUNK_CHARS):
                if chars:  # only a validation text can have a character that is not in the vocabulary
                    ids = []
                    for _, text, _ in batch:
                        piece_ids, lost = char_ids(vocab, text.replace(EOT, ""))
                        ids.append(piece_ids)
                        dropped.update(lost)
                else:  # tiktoken releases the GIL while it encodes, so its threads really run in parallel
                    texts = [text for _, text, _ in batch]
                    ids = enc.encode_batch(texts, num_threads=workers, allowed_special={EOT})
                for (split, _, _), piece_ids in zip(batch, ids):
                    write(out[split], np.array(piece_ids, dtype=np.uint16).tobytes())
                done += sum(n for _, _, n in batch)
                if time.time() - shown > 2:  # a progress line for big inputs
                    print(f"{done / 1e6:,.1f}/{total_mb:,.1f} MB", file=sys.stderr, flush=True)
                    shown = time.time()
            counts = {split: f.tell() // 2 for split, f in out.items()}
        for split, path in (("train", input_path), ("val", val_input or input_path)):
            if counts[split] == 0:  # training or evaluating on nothing is never what was meant
                raise PrepareError(f"{path}: no text for {split}.bin (try another --val_frac or --val_input)")
        if chars:
            meta = {"tokenizer": "chars", "vocab_size": len(vocab), "chars": vocab}
            meta.update(val_dropped=sum(dropped.values()), val_dropped_chars="".join(sorted(dropped)))
        else:
            meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot_token": enc.eot_token}
        meta.update(dtype="uint16", train_tokens=counts["train"], val_tokens=counts["val"])
        meta.update(
            source=source or input_path, val_source=val_input, val_frac=None if val_input else val_frac
        )
        with open(tmp["meta.json"], "wb") as f:
            write(f, json.dumps(meta, indent=2).encode())
        for name in OUTPUTS:  # the real names appear only now, all three complete
            os.replace(tmp[name], os.path.join(out_dir, name))
        return meta
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)


def download(url):
    """data/tinystories/<url's file name>, downloaded unless an earlier run did."""
    path = os.path.join("data", "tinystories", os.path.basename(url))
    if not os.path.exists(path):
        print(f"downloading {url} -> {path}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                os.makedirs(os.path.dirname(path), exist_ok=True)  # only now: offline, no new empty folder
                with open(path + ".part", "wb") as f:  # renamed when complete: never taken for the file
                    while block := response.read(1 << 20):
                        write(f, block)
            os.replace(path + ".part", path)
        except (OSError, ValueError, http.client.HTTPException) as e:
            advice = "offline? `python prepare_data.py` prepares the Tiny Shakespeare shipped with it"
            raise PrepareError(f"download of {url} failed ({e}); {advice}") from None
        finally:
            if os.path.exists(path + ".part"):
                os.remove(path + ".part")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dataset", choices=["tinyshakespeare", "tinystories"], help="(default: the first)")
    what.add_argument("--input", help="a .txt file, a folder of .txt files, or a .jsonl file")
    parser.add_argument("--val_input", help="validation text (same kinds as --input) instead of a split")
    parser.add_argument("--val_frac", type=float, default=0.1, help="see the split above (default: 0.1)")
    parser.add_argument("--out_dir", help="output folder (default: data/<dataset or input name>)")
    parser.add_argument("--chars", action="store_true", help="an id per character (see above)")
    parser.add_argument("--force", action="store_true", help="overwrite existing train.bin/val.bin/meta.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads (default: CPUs)")
    args = parser.parse_args(argv)
    if (args.val_input and not args.input) or args.workers < 1 or not 0 < args.val_frac < 1:
        parser.error("--val_input needs --input, --workers at least 1, --val_frac between 0 and 1")
    name = args.dataset or "tinyshakespeare"
    if args.input:
        name = os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]  # book.txt: data/book
    out_dir = args.out_dir or os.path.join("data", name + ("_char" if args.chars else ""))
    kw = dict(val_frac=args.val_frac, force=args.force, workers=args.workers, chars=args.chars)
    try:
        if args.input:
            meta = prepare(args.input, out_dir, val_input=args.val_input, **kw)
        elif name == "tinystories":  # TinyStories V2: a 2 GB download, with its own validation file
            train, val = download(TINYSTORIES.format("train")), download(TINYSTORIES.format("valid"))
            meta = prepare(train, out_dir, val_input=val, **kw)
        else:  # Tiny Shakespeare ships gzipped in assets/: tokenize a plain copy of it
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "tinyshakespeare.txt")
                with gzip.open(os.path.join(ASSETS, "tinyshakespeare.txt.gz")) as f, open(path, "wb") as out:
                    write(out, f.read())
                meta = prepare(path, out_dir, source="assets/tinyshakespeare.txt.gz", **kw)
    except (PrepareError, OSError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"prepare_data: interrupted; {out_dir} is as it was", file=sys.stderr)
        sys.exit(130)
    for split in ("train", "val"):
        print(f"{split}: {meta[split + '_tokens']:,} tokens -> {os.path.join(out_dir, split + '.bin')}")
    if meta.get("val_dropped"):
        n, lost = meta["val_dropped"], meta["val_dropped_chars"]
        print(f"val: dropped {n:,} characters that the training text lacks ({len(lost)} distinct: {lost!r})")
    script = os.path.relpath(os.path.join(os.path.dirname(ASSETS), "patchgpt.py"))
    print("next:", shlex.join([os.path.basename(sys.executable), script, "--data_dir", out_dir]))


if __name__ == "__main__":
    main()
