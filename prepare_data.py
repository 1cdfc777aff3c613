"""
Turn text into the token files patchgpt.py trains on.

Writes, into one output folder:
    train.bin, val.bin   GPT-2 token ids as raw np.uint16 (no header); read them with
                         np.memmap("data/tinyshakespeare/train.bin", dtype=np.uint16, mode="r")
    meta.json            tokenizer, vocab size, end-of-text id, token counts and sources

Usage:
    python prepare_data.py                          # Tiny Shakespeare (in assets/) -> data/tinyshakespeare/
    python prepare_data.py --input book.txt         # your text -> data/book/, then it prints the next step:
    python patchgpt.py --data_dir data/book         #   training on it
    python prepare_data.py --input books/ --val_input heldout/ --out_dir data/books
    python prepare_data.py --input wiki.jsonl --val_frac 0.05
    python prepare_data.py --dataset tinystories    # TinyStories V2 (a 2 GB download, own val file)

--input takes a .txt file, a folder of .txt files (searched recursively, in sorted order) or a
.jsonl file with a "text" field per line. Every file of a folder and every jsonl record is one
document, and the end-of-text token (50256) follows each document. A literal "<|endoftext|>"
inside the text also becomes that token, since TinyStories uses it to separate stories.
Without --val_input the last --val_frac of the input's bytes becomes the validation set.

Only --dataset tinystories needs the network: GPT-2's tokenizer files are shipped in assets/ too,
for when tiktoken has not downloaded them yet.
"""

import argparse
import contextlib
import errno
import functools
import gzip
import hashlib
import http.client
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import unittest.mock
import urllib.request
from typing import NamedTuple

import numpy as np
import tiktoken
import tiktoken.load

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
TINYSTORIES = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
               "TinyStoriesV2-GPT4-{}.txt")  # {}: train or valid
DATASETS = ("tinyshakespeare", "tinystories")  # the first is shipped in assets/, the second downloaded
# tiktoken's gpt2 files: the URL it caches them under and the sha256 it checks; assets/gpt2_<name>.gz
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
try:  # the pattern tiktoken's own gpt2 uses: newer versions have a faster equivalent of GPT-2's
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR
except ImportError:
    GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHUNK_BYTES = 1 << 20  # read size; one chunk is one unit of work for a tokenizer thread
EOT_TEXT = "<|endoftext|>"
EOT_BYTES = EOT_TEXT.encode()
EOT_ID = 50256  # gpt2's <|endoftext|>
VOCAB_SIZE = 50257  # fits in uint16, which halves the files compared to int32
OUTPUTS = ("train.bin", "val.bin", "meta.json")


class PrepareError(Exception):
    """Bad input or refused output; main() prints it as one line and exits with code 2."""


class Piece(NamedTuple):
    """A run of text from the input; start/end are byte offsets across all input files."""
    text: str
    start: int
    end: int
    doc_end: bool     # the last piece of a document: an end-of-text token follows it
    splittable: bool  # text bytes map 1:1 to input bytes (.txt), so it may be cut at any offset


# ----------------------------------------------------------------------------- reading

def list_input(path):
    """The files behind an --input path, in the order their text is used."""
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        files = [os.path.join(root, name) for root, _, names in os.walk(path)
                 for name in names if name.endswith(".txt")]
        if not files:
            raise PrepareError(f"{path}: folder has no .txt files")
        # os.walk order depends on the filesystem; sorting makes the token files reproducible
        files.sort(key=lambda f: os.path.relpath(f, path).split(os.sep))
        if sum(os.path.getsize(f) for f in files) == 0:
            raise PrepareError(f"{path}: all .txt files are empty")
        return files
    if os.path.getsize(path) == 0:
        raise PrepareError(f"{path}: empty file")
    return [path]


def safe_cut(buf, k):
    """The largest cut point <= k that splits neither a UTF-8 character nor an <|endoftext|> marker."""
    if k <= 0:
        return 0
    # UTF-8 continuation bytes look like 0b10xxxxxx; a character is at most 4 bytes long
    for _ in range(3):
        if k < len(buf) and buf[k] & 0xC0 == 0x80:
            k -= 1
    # a marker cut in two would be encoded as plain characters instead of the end-of-text token
    m = buf.find(EOT_BYTES, max(0, k - len(EOT_BYTES) + 1), k + len(EOT_BYTES) - 1)
    return m if m != -1 else k


def token_cut(buf, k, window=1 << 16):
    """Move a cut point back to where gpt2's pre-tokenizer splits the text anyway, if one is near.

    No gpt2 token spans "x| y" or "x\n|y" (x, y not whitespace), so pieces cut there encode to
    exactly the tokens of the whole text; a cut anywhere else may split a word into odd tokens.
    """
    lo, cuts = max(1, k - window), []
    for sep, shift in ((b" ", 0), (b"\n", 1)):
        i = buf.rfind(sep, lo, k)
        while i > 0 and (buf[i - 1:i].isspace() or buf[i + 1:i + 2].isspace()):
            i = buf.rfind(sep, lo, i)
        if i > 0:
            cuts.append(i + shift)
    return max(cuts, default=k)


def decode_utf8(raw, path, offset):
    try:
        return raw.decode("utf-8")  # strict: silently replaced bytes would be trained on
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}") from None


def read_text_file(path, chunk_bytes=CHUNK_BYTES):
    """Yield (offset, n_bytes, text, is_last) for consecutive pieces of a UTF-8 file, in bounded memory."""
    with open(path, "rb") as f:
        offset, buf = 0, b""
        while True:
            data = f.read(chunk_bytes)
            buf += data
            # hold the last few bytes back until we know whether they start a character or a marker
            cut = token_cut(buf, safe_cut(buf, len(buf) - len(EOT_BYTES))) if data else len(buf)
            if cut > 0:
                yield offset, cut, decode_utf8(buf[:cut], path, offset), not data
                offset, buf = offset + cut, buf[cut:]
            if not data:
                return


def read_jsonl(path):
    """Yield (offset, n_bytes, text) for every record (line) of a .jsonl file."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if line.strip():
                try:
                    record = json.loads(decode_utf8(line, where, offset))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{where}: not valid JSON ({e.msg})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise PrepareError(f'{where}: no "text" string')
                try:
                    text.encode("utf-8")  # a lone surrogate from a \ud800 escape can't be tokenized
                except UnicodeEncodeError:
                    raise PrepareError(f"{where}: text is not valid Unicode") from None
                yield offset, len(line), text
            offset += len(line)


def iter_pieces(path, chunk_bytes=None):
    """Yield the Pieces of all documents under an --input path; empty documents are skipped."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    base = 0
    for file in list_input(path):
        if file.endswith(".jsonl"):
            for offset, n_bytes, text in read_jsonl(file):
                if text:
                    yield Piece(text, base + offset, base + offset + n_bytes, True, False)
        else:
            for offset, n_bytes, text, is_last in read_text_file(file, chunk_bytes):
                yield Piece(text, base + offset, base + offset + n_bytes, is_last, True)
        base += os.path.getsize(file)


def split_pieces(pieces, split_at):
    """Label pieces "train" before byte offset split_at and "val" after it (None: all train)."""
    for p in pieces:
        if split_at is None or p.end <= split_at:
            yield "train", p
        elif p.start >= split_at:
            yield "val", p
        elif not p.splittable:
            yield "train", p  # a jsonl record is never cut: it goes where it starts
        else:
            # the piece straddles the split: the exact offset, moved back to a character boundary
            raw = p.text.encode()
            k = safe_cut(raw, split_at - p.start)
            yield "train", p._replace(text=raw[:k].decode(), end=p.start + k, doc_end=False)
            yield "val", p._replace(text=raw[k:].decode(), start=p.start + k)


# ----------------------------------------------------------------------------- encoding

def tiktoken_has_gpt2():
    """Whether tiktoken's cache holds gpt2's files; without them tiktoken.get_encoding downloads."""
    # where tiktoken.load.read_file_cached looks: this folder, each file named by the sha1 of its URL
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    return cache != "" and all(os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                               for url, _ in GPT2_FILES.values())


def gpt2_from_assets():
    """tiktoken's gpt2 Encoding, built by tiktoken's own loader from the copies in assets/."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, (_, sha256) in GPT2_FILES.items():
            with gzip.open(os.path.join(ASSETS, f"gpt2_{name}.gz")) as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError(f"assets/gpt2_{name}.gz is not GPT-2's {name}")
            paths.append(os.path.join(tmp, name))
            with open(paths[-1], "wb") as f:
                f.write(data)
        # "" turns tiktoken's cache off, which would otherwise keep a copy of each temporary file
        with unittest.mock.patch.dict(os.environ, TIKTOKEN_CACHE_DIR=""):
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(*paths)
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


@functools.lru_cache(maxsize=None)
def get_encoding():
    """GPT-2's tokenizer (a tiktoken Encoding) without the network, unless assets/ has lost its copy.

    tiktoken's own is used when its cache has the files. Otherwise tiktoken would download them,
    with no timeout (a network that drops packets stalls it for minutes), so the identical copy in
    assets/ comes first and the download is the last resort.
    """
    loaders = {"assets": gpt2_from_assets, "tiktoken": lambda: tiktoken.get_encoding("gpt2")}
    errors = {}
    for source in ["tiktoken", "assets"] if tiktoken_has_gpt2() else ["assets", "tiktoken"]:
        try:
            return loaders[source]()
        except Exception as e:  # whatever breaks one source (a damaged cache, no network), try the other
            errors[source] = type(e).__name__
    raise PrepareError(f"cannot load the gpt2 tokenizer: no usable copy in {ASSETS} ({errors['assets']})"
                       f" and tiktoken could not download it ({errors['tiktoken']}); restore {ASSETS} from"
                       " the patchgpt repository, or connect to the internet once and rerun")


def encode_pieces(enc, pieces, workers):
    """Token ids of pieces as uint16; markers and document ends become end-of-text tokens."""
    parts, layout = [], []
    for p in pieces:
        texts = p.text.split(EOT_TEXT)
        parts.extend(texts)
        layout.append((len(texts), p.doc_end))
    # tiktoken releases the GIL while encoding, so threads give real parallelism
    encoded = iter(enc.encode_ordinary_batch(parts, num_threads=workers))
    eot = np.array([EOT_ID], dtype=np.uint16)
    out = []
    for n_texts, doc_end in layout:
        for i in range(n_texts):
            if i > 0:
                out.append(eot)
            out.append(np.array(next(encoded), dtype=np.uint16))
        if doc_end:
            out.append(eot)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


class TokenWriter:
    """Appends encoded pieces to path + ".tmp", a batch at a time, so memory stays bounded."""

    def __init__(self, path, enc, workers, batch_chars):
        self.path, self.enc, self.workers, self.batch_chars = path, enc, workers, batch_chars
        self.file = open(path + ".tmp", "wb")
        self.pending, self.pending_chars, self.tokens = [], 0, 0

    def add(self, piece):
        self.pending.append(piece)
        self.pending_chars += len(piece.text)
        if self.pending_chars >= self.batch_chars:
            self.flush()

    def flush(self):
        ids = encode_pieces(self.enc, self.pending, self.workers)
        with writing(self.path):
            self.file.write(ids.tobytes())  # not ids.tofile: on a full disk numpy may drop the error
        self.tokens += len(ids)
        self.pending, self.pending_chars = [], 0


@contextlib.contextmanager
def writing(path):
    """Turn a full disk into one line that says so and names the file, not a bare [Errno 28]."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        message = f"disk full: no space left for {path}; free some space on that disk and rerun"
        raise PrepareError(message) from None


class Progress:
    """Prints bytes done / total, speed and token count to stderr, at most every `every` seconds."""

    def __init__(self, total, every=2.0):
        self.total, self.every = total, every
        self.t0 = self.last = time.time()

    def update(self, done, tokens=None, final=False):
        now = time.time()
        if not final and now - self.last < self.every:
            return
        self.last = now
        mb_s = done / 1e6 / max(now - self.t0, 1e-9)
        line = f"{done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  {mb_s:.1f} MB/s"
        if tokens is not None:
            line += f"  {tokens:,} tokens"
        print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the whole job

def check_outputs(out_dir, force):
    existing = [path for path in (os.path.join(out_dir, name) for name in OUTPUTS) if os.path.exists(path)]
    if existing and not force:
        raise PrepareError(f"{existing[0]} already exists (pass --force to overwrite)")


@contextlib.contextmanager
def new_dirs(path):
    """os.makedirs(path); if the block fails, the folders made here are removed again while empty."""
    made, folder = [], os.path.abspath(path)
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first; one that is not empty keeps its parents too
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def prepare(input_path, out_dir, val_input=None, val_frac=0.1, force=False, workers=None, chunk_bytes=None,
            source=None):
    """Tokenize input_path (and val_input) into out_dir/{train,val}.bin and meta.json; returns the meta dict.

    source names input_path in meta.json when it is a temporary copy. On any failure, Ctrl-C included,
    out_dir is left as it was: no .tmp files, earlier outputs intact, no new empty folders.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    workers = workers or os.cpu_count() or 1
    # validate everything before touching out_dir, so a bad call leaves it as it was
    if val_input is None and not 0 < val_frac < 1:
        raise PrepareError(f"--val_frac must be between 0 and 1, got {val_frac}")
    files = list_input(input_path)
    val_files = list_input(val_input) if val_input is not None else []
    check_outputs(out_dir, force)
    input_bytes = sum(os.path.getsize(f) for f in files)
    split_at = None if val_input is not None else int(input_bytes * (1 - val_frac))
    enc = get_encoding()

    labelled = split_pieces(iter_pieces(input_path, chunk_bytes), split_at)
    if val_input is not None:
        labelled = itertools.chain(labelled, (("val", p) for p in iter_pieces(val_input, chunk_bytes)))
    progress = Progress(input_bytes + sum(os.path.getsize(f) for f in val_files))
    paths = {name: os.path.join(out_dir, name) for name in OUTPUTS}
    writers = {}
    with new_dirs(out_dir):
        try:
            for split in ("train", "val"):
                writers[split] = TokenWriter(paths[f"{split}.bin"], enc, workers, workers * chunk_bytes)
            done = 0
            for split, piece in labelled:
                writers[split].add(piece)
                done += piece.end - piece.start
                progress.update(done, writers["train"].tokens + writers["val"].tokens)
            for w in writers.values():
                w.flush()
                with writing(w.path):
                    w.file.close()
            counts = {split: w.tokens for split, w in writers.items()}
            check_counts(counts, input_path, val_input, val_frac)

            meta = {"tokenizer": "gpt2", "vocab_size": VOCAB_SIZE, "eot_token": EOT_ID, "dtype": "uint16",
                    "train_tokens": counts["train"], "val_tokens": counts["val"],
                    "source": source or input_path, "val_source": val_input,
                    "val_frac": None if val_input is not None else val_frac}
            with writing(paths["meta.json"]), open(paths["meta.json"] + ".tmp", "w") as f:
                json.dump(meta, f, indent=2)
            # the real names appear only now, so a crash never leaves half-written bins behind
            for name in OUTPUTS:
                os.replace(paths[name] + ".tmp", paths[name])
            progress.update(done, sum(counts.values()), final=True)
        finally:
            for w in writers.values():
                with contextlib.suppress(OSError):  # the disk is full again, while giving up anyway
                    w.file.close()
            for path in paths.values():
                if os.path.exists(path + ".tmp"):
                    os.remove(path + ".tmp")
    return meta


def prepare_tinyshakespeare(out_dir, **kw):
    """Prepare the Tiny Shakespeare shipped in assets/: the same tokens as --input on its plain text."""
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "tinyshakespeare.txt")
        with gzip.open(os.path.join(ASSETS, "tinyshakespeare.txt.gz")) as src, writing(text), \
                open(text, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return prepare(text, out_dir, source="assets/tinyshakespeare.txt.gz", **kw)


def check_counts(counts, input_path, val_input, val_frac):
    """Refuse outputs with an empty side: training or evaluating on nothing is never intended."""
    if counts["train"] == 0 and (val_input is not None or counts["val"] == 0):
        raise PrepareError(f"{input_path}: yields no text")
    if val_input is not None and counts["val"] == 0:
        raise PrepareError(f"{val_input}: yields no text")
    for split in ("train", "val"):
        if counts[split] == 0:
            raise PrepareError(f"--val_frac {val_frac} leaves {split} empty for {input_path}; "
                               "change --val_frac or pass --val_input")


# ----------------------------------------------------------------------------- downloads and CLI

def download(url, path):
    """Fetch url to path unless it is already there (the cache)."""
    if os.path.exists(path):
        return path
    part = path + ".part"  # renamed when complete, so an interrupted download is never mistaken for the file
    print(f"downloading {url} -> {path}")
    with new_dirs(os.path.dirname(path) or "."):
        try:
            with urllib.request.urlopen(url, timeout=30) as response, writing(part), open(part, "wb") as f:
                progress = Progress(int(response.headers.get("Content-Length") or 0))
                done = 0
                while block := response.read(1 << 20):
                    f.write(block)
                    done += len(block)
                    progress.update(done)
            os.replace(part, path)
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise PrepareError(f"download of {url} failed ({getattr(e, 'reason', None) or e}); offline? "
                               "`python prepare_data.py` prepares the Tiny Shakespeare shipped with it, "
                               "--input PATH your own text") from None
        finally:
            if os.path.exists(part):
                os.remove(part)
    return path


def next_command(out_dir):
    """The command that trains on out_dir, as one can type it here: python, patchgpt.py, the folder."""
    python = os.path.basename(sys.executable)
    python = python if shutil.which(python) else sys.executable
    script = os.path.relpath(os.path.join(HERE, "patchgpt.py"))
    script = os.path.join(HERE, "patchgpt.py") if script.startswith(os.pardir) else script
    return " ".join(shlex.quote(a) for a in (python, script, "--data_dir", out_dir))


def input_name(path):
    """data/<name> for an --input: the file's or folder's name without extension."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other refusal here
        fail(message)


def fail(message):
    print(f"prepare_data: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = Parser(description="Tokenize text into train.bin/val.bin (gpt2, uint16) for patchgpt.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=DATASETS,
                        help="tinyshakespeare (the default) is shipped with this script; "
                             "tinystories is downloaded once (2 GB) into data/tinystories/")
    source.add_argument("--input", help="a .txt file, a folder of .txt files, or a .jsonl file "
                                        "with a 'text' field")
    parser.add_argument("--val_input", help="separate validation text (same kinds as --input) "
                                            "instead of a split")
    parser.add_argument("--val_frac", type=float, default=0.1, help="without --val_input: the last fraction "
                        "of the input's bytes used for validation (default: %(default)s)")
    parser.add_argument("--out_dir", help="output folder (default: data/<dataset or input name>, "
                                          "e.g. data/tinyshakespeare)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing train.bin/val.bin/meta.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer threads (default: %(default)s, the number of CPUs)")
    args = parser.parse_args(argv)
    if args.val_input and not args.input:
        parser.error("--val_input needs --input")
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    t0 = time.time()
    name = input_name(args.input) if args.input else args.dataset or DATASETS[0]
    out_dir = args.out_dir or os.path.join("data", name)
    kw = dict(val_frac=args.val_frac, force=args.force, workers=args.workers)
    try:
        check_outputs(out_dir, args.force)  # before a download, which may be large
        if args.input:
            meta = prepare(args.input, out_dir, val_input=args.val_input, **kw)
        elif name == "tinystories":
            urls = [TINYSTORIES.format(split) for split in ("train", "valid")]
            train, val = (download(url, os.path.join("data", name, os.path.basename(url))) for url in urls)
            meta = prepare(train, out_dir, val_input=val, **kw)
        else:
            meta = prepare_tinyshakespeare(out_dir, **kw)
    except (PrepareError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(f"prepare_data: interrupted; {out_dir} is as it was", file=sys.stderr)
        sys.exit(130)
    for split in ("train", "val"):
        print(f"{split}: {meta[split + '_tokens']:,} tokens -> {os.path.join(out_dir, split + '.bin')}")
    print(f"meta -> {os.path.join(out_dir, 'meta.json')}  ({time.time() - t0:.1f} s)")
    print(f"next: {next_command(out_dir)}")


if __name__ == "__main__":
    main()
