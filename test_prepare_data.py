"""Tests for prepare_data.py: python -m pytest -q test_prepare_data.py (works offline)."""

import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from functools import partial

import numpy as np
import pytest
import tiktoken

import prepare_data as pd

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "prepare_data.py")
# the team's read-only folder, beside every developer's clone and CI's: tiktoken's own gpt2 files, offline
SHARED = os.path.join(HERE, "..", "shared")
EOT = "<|endoftext|>"
# what prepare_data.py made of the shipped Tiny Shakespeare before its rewrite: 90/10 of 1,115,394 bytes
SHAKESPEARE_TOKENS = {"train": 301_966, "val": 36_060}
SHAKESPEARE_SHA256 = {
    "train": "502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f",
    "val": "3338144c7e9eb2828d9b19fe4b9e3688d6f9026f4f14f91f1a20756a3b2605c1",
}
# prose with what makes tokenizing subtle: multibyte characters, runs of whitespace, a no-break space before
# a newline, an end-of-text marker and half of one
TEXT = (
    "The king said to his fool, and then went home. Why?\n"
    "Café naïve 日本語のテキスト 🎉🐍 ẞ ok.\n"
    "  indented,\tthen a tab.\n\n"
    "a\xa0\nno-break space before a newline\n"
    "one" + EOT + "two <|endof half a marker\n"
)


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    return str(path)


def ids(out_dir, split):
    return np.fromfile(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16).tolist()


def encode(text):
    return pd.get_encoding().encode(text, allowed_special={EOT})


def decode(out_dir, *splits):
    tokens = []
    for split in splits:
        tokens += ids(out_dir, split)
    return pd.get_encoding().decode(tokens)


def shakespeare():
    with gzip.open(
        os.path.join(HERE, "assets", "tinyshakespeare.txt.gz"), "rt", encoding="utf-8", newline=""
    ) as f:
        return f.read()


def split_byte(raw, val_frac):
    """Where prepare_data.py has always split one file: that byte, or the start of its character or marker."""
    k = int(len(raw) * (1 - val_frac))
    while raw[k] & 0xC0 == 0x80:
        k -= 1
    marker = raw.find(EOT.encode(), k - len(EOT) + 1, k + len(EOT) - 1)
    return k if marker == -1 else marker


def main(capsys, *args):
    """prepare_data.main(args) here, as the command line calls it: (exit code, stdout, stderr)."""
    try:
        pd.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prepare_data: error: "), err
    return lines[0]


def offline_env(tmp_path):
    """The environment of a user with no network and nothing in tiktoken's cache."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update({k: "http://127.0.0.1:9" for k in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY")})
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty_tiktoken_cache")
    os.makedirs(env["TIKTOKEN_CACHE_DIR"], exist_ok=True)
    return env


# ----------------------------------------------------------------------------- what comes out


# The default run offline (`python prepare_data.py`: today's tokens, meta.json, nothing in tiktoken's cache)
# is checked where patchgpt.py makes it on a user's first run, so that Tiny Shakespeare is tokenized once:
# test_patchgpt.py::test_default_run_and_sampling_work_offline_from_a_fresh_folder


@pytest.mark.parametrize("chunk_chars", [64, None])  # None: the real 1M characters
@pytest.mark.parametrize("inside", [b"king", "日".encode(), "🐍".encode(), EOT.encode()])
def test_txt_split_is_todays_exact_byte(tmp_path, capsys, monkeypatch, inside, chunk_chars):
    if chunk_chars:
        monkeypatch.setattr(pd, "CHUNK_CHARS", chunk_chars)
    text = "".join(f"{i}. {TEXT}" for i in range(40))
    raw = text.encode()
    start = raw.find(inside, len(raw) // 2)  # the split falls 2 bytes into this word, character or marker
    val_frac = 1 - (start + 2.5) / len(raw)  # int(len(raw) * (1 - val_frac)) == start + 2
    src = write(tmp_path / "book.txt", text)
    code, _, err = main(
        capsys, "--input", src, "--val_frac", val_frac, "--out_dir", tmp_path / "out", "--workers", 2
    )
    assert code == 0, err
    k = split_byte(raw, val_frac)
    assert k == (start + 2 if inside == b"king" else start)
    assert ids(tmp_path / "out", "train") == encode(raw[:k].decode())
    assert ids(tmp_path / "out", "val") == encode(raw[k:].decode() + EOT)


@pytest.mark.parametrize("chunk_chars", [64, 1000])
def test_chunked_reading_gives_the_tokens_of_the_whole_text(tmp_path, capsys, monkeypatch, chunk_chars):
    monkeypatch.setattr(pd, "CHUNK_CHARS", chunk_chars)  # a 25 KB text in many pieces, cut where it is safe
    text = "".join(f"{i}. {TEXT}" for i in range(200))
    args = ["--input", write(tmp_path / "in.txt", text), "--val_input", write(tmp_path / "v.txt", TEXT)]
    code, _, err = main(capsys, *args, "--out_dir", tmp_path / "out", "--workers", 2)
    assert code == 0, err
    assert ids(tmp_path / "out", "train") == encode(text + EOT)
    assert ids(tmp_path / "out", "val") == encode(TEXT + EOT)


def test_folder_is_recursive_sorted_one_document_per_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_CHARS", 64)
    docs = {
        "b.txt": "Bravo " * 200,
        "a.txt": "Alpha\n" * 200,
        "z.txt": "Zulu é " * 100,
        "sub/c.txt": "Charlie 日本\n" * 100,
        "sub/deeper/d.txt": "Delta 🎉\n" * 100,
    }
    for name, content in docs.items():
        write(tmp_path / "books" / name, content)
    write(tmp_path / "books" / "empty.txt", "")  # an empty document adds nothing, not even an end-of-text
    write(tmp_path / "books" / "notes.md", "not text for training")
    code, _, err = main(capsys, "--input", tmp_path / "books", "--out_dir", tmp_path / "out")
    assert code == 0, err
    order = ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt", "z.txt"]
    assert decode(tmp_path / "out", "train", "val") == "".join(docs[name] + EOT for name in order)


def test_jsonl_records_are_documents_and_never_cut(tmp_path, capsys):
    texts = [f'Record {i}: a "quoted" line,\nthen Ünïcödé 日本 {i}.\n' * (1 + i % 3) for i in range(40)]
    lines = [json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)]
    lines.insert(5, json.dumps({"text": ""}) + "\n")  # empty documents are skipped
    lines.insert(9, "   \n")  # blank lines too
    src = write(tmp_path / "wiki.jsonl", "".join(lines))
    code, _, err = main(capsys, "--input", src, "--out_dir", tmp_path / "out")
    assert code == 0, err
    # from the input alone: a record goes to val.bin if its line starts at or after the split byte
    split_at = int(len("".join(lines).encode()) * (1 - 0.1))
    starts = np.cumsum([0] + [len(line.encode()) for line in lines[:-1]])
    n_val = sum(
        start >= split_at for start, line in zip(starts, lines) if line.strip() and json.loads(line)["text"]
    )
    assert 2 <= n_val <= 6  # the split falls between records, with some in each file
    assert ids(tmp_path / "out", "train") == encode("".join(t + EOT for t in texts[:-n_val]))
    assert ids(tmp_path / "out", "val") == encode("".join(t + EOT for t in texts[-n_val:]))


def test_val_input_and_meta_and_default_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "poems.txt", TEXT * 3)
    write(tmp_path / "held" / "out.jsonl", json.dumps({"text": "held out"}) + "\n")
    code, out, err = main(capsys, "--input", "poems.txt", "--val_input", "held/out.jsonl")
    assert code == 0, err
    assert ids("data/poems", "train") == encode(TEXT * 3 + EOT)  # all of --input
    assert ids("data/poems", "val") == encode("held out" + EOT)
    meta = json.load(open("data/poems/meta.json"))
    assert (
        meta["source"] == "poems.txt" and meta["val_source"] == "held/out.jsonl" and meta["val_frac"] is None
    )
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(encode(TEXT * 3)) + 1, 3)
    assert f"train: {meta['train_tokens']:,} tokens -> data/poems/train.bin" in out


def test_prints_the_command_that_trains_on_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = main(capsys, "--input", write(tmp_path / "book.txt", TEXT * 3))
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    python, script, *rest = last.removeprefix("next: ").split()
    assert shutil.which(python) and os.path.samefile(script, os.path.join(HERE, "patchgpt.py"))
    assert rest == ["--data_dir", "data/book"]


# ----------------------------------------------------------------------------- the tokenizer


def test_shipped_tinyshakespeare_is_char_rnns_input_txt():
    data = shakespeare().encode()
    assert len(data) == 1_115_394
    sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # assets/README.md
    assert hashlib.sha256(data).hexdigest() == sha256


def test_tokenizer_comes_from_assets_without_the_network(monkeypatch):
    def download(*args):
        raise AssertionError("tiktoken would download here: offline that may hang for minutes")

    monkeypatch.setattr(tiktoken, "get_encoding", download)
    enc = pd.get_encoding.__wrapped__()  # not the cached result of an earlier call
    assert (enc.name, enc.n_vocab, enc.eot_token) == ("gpt2", 50257, 50256)
    assert enc.encode("Hello world" + EOT, allowed_special={EOT}) == [15496, 995, 50256]


def test_tokenizer_from_assets_is_tiktokens_gpt2(monkeypatch):
    cache = os.path.join(SHARED, "tiktoken_cache")
    if not os.path.isdir(cache):  # a user's clone; CI (CI=true) has the folder, and must run this test
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no {cache}: tiktoken's gpt2 needs it offline"
        )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", cache)  # tiktoken finds its files there, by their URL's sha1
    ours, real = pd.get_encoding(), tiktoken.get_encoding("gpt2")
    text = shakespeare() + TEXT
    assert ours.encode(text, allowed_special={EOT}) == real.encode(text, allowed_special={EOT})
    assert len(ours.encode_ordinary(shakespeare())) == 338_025
    with pytest.raises(ValueError):  # like tiktoken's, a marker in plain text is refused by default
        ours.encode(TEXT)


@pytest.mark.parametrize("assets", ["missing", "damaged"])
def test_no_usable_tokenizer_is_a_prepare_error(tmp_path, monkeypatch, assets):
    def offline(*args):
        raise OSError("no network")

    if assets == "damaged":
        write(tmp_path / "gpt2_encoder.json.gz", gzip.compress(b'{"!": 0}'))
    monkeypatch.setattr(pd, "ASSETS", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    message = "go online" if assets == "missing" else "is not GPT-2's encoder.json"
    with pytest.raises(pd.PrepareError, match=message):
        pd.get_encoding.__wrapped__()


# ----------------------------------------------------------------------------- refusals


def bad_inputs(tmp):
    """(arguments, what the one error line says) for inputs prepare_data.py must refuse."""
    write(tmp / "ok.txt", "fine text\n" * 10)
    return [
        ([tmp / "missing.txt"], "missing.txt: no such file or directory"),
        ([write(tmp / "empty.txt", "")], "empty.txt: no text"),
        ([os.path.dirname(write(tmp / "no_txt" / "readme.md", "hi"))], "no_txt: no text"),
        ([os.path.dirname(write(tmp / "all_empty" / "a.txt", ""))], "all_empty: no text"),
        ([write(tmp / "latin1.txt", b"plain ascii, then caf\xe9 au lait")], "latin1.txt: not valid UTF-8"),
        (
            [write(tmp / "bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n')],
            "bad.jsonl:2: not valid JSON",
        ),
        (
            [write(tmp / "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')],
            "latin1.jsonl:2: not valid",
        ),
        (
            [write(tmp / "no_text.jsonl", '{"text": "ok"}\n{"body": "x"}\n')],
            'no_text.jsonl:2: no "text" string',
        ),
        ([write(tmp / "not_str.jsonl", '{"text": ["a"]}\n')], 'not_str.jsonl:1: no "text" string'),
        ([write(tmp / "only_empty.jsonl", '{"text": ""}\n\n')], "only_empty.jsonl: no text for train.bin"),
        ([write(tmp / "one.jsonl", '{"text": "one record"}\n')], "one.jsonl: no text for val.bin"),
        ([tmp / "ok.txt", "--val_input", tmp / "missing.txt"], "missing.txt: no such file"),
        ([tmp / "ok.txt", "--val_input", tmp / "only_empty.jsonl"], "only_empty.jsonl: no text for val.bin"),
    ]


def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys):
    for i, (args, message) in enumerate(bad_inputs(tmp_path)):  # each case, a new one too
        out = tmp_path / f"out{i}"
        code, _, err = main(capsys, "--input", *args, "--out_dir", out)
        assert message in one_line_error(code, err), message
        # no output; a new out_dir may stay behind, empty, when the input fails only once it is read
        assert not out.exists() or os.listdir(out) == [], message


@pytest.mark.parametrize("args", [["--val_frac", "1.5"], ["--workers", "0"], ["--val_input", "x.txt"]])
def test_bad_flags_exit_2(capsys, args):
    code, _, err = main(capsys, *args)
    assert code == 2 and "error: --val_input needs --input, --workers at least 1" in err


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = write(tmp_path / "in.txt", TEXT * 3)
    write(tmp_path / "out" / "train.bin", b"old tokens")
    code, _, err = main(capsys, "--input", src, "--out_dir", tmp_path / "out")
    assert "has outputs already (pass --force" in one_line_error(code, err)
    assert (
        os.listdir(tmp_path / "out") == ["train.bin"]
        and (tmp_path / "out" / "train.bin").read_bytes() == b"old tokens"
    )
    code, _, err = main(capsys, "--input", src, "--out_dir", tmp_path / "out", "--force")
    assert code == 0, err
    assert decode(tmp_path / "out", "train", "val") == TEXT * 3 + EOT


def earlier_outputs(out_dir):
    for name in pd.OUTPUTS:
        write(out_dir / name, b"earlier " + name.encode())


def assert_earlier_outputs_kept(out_dir):
    assert sorted(os.listdir(out_dir)) == sorted(pd.OUTPUTS)  # no .tmp left
    assert all((out_dir / name).read_bytes() == b"earlier " + name.encode() for name in pd.OUTPUTS)


def test_failure_midway_keeps_earlier_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_CHARS", 64)  # so that tokens are written before the bad file is read
    write(tmp_path / "books" / "a.txt", TEXT * 20)
    write(tmp_path / "books" / "b.txt", b"more text \xff")
    earlier_outputs(tmp_path / "out")
    code, _, err = main(capsys, "--input", tmp_path / "books", "--out_dir", tmp_path / "out", "--force")
    assert "b.txt: not valid UTF-8" in one_line_error(code, err)
    assert_earlier_outputs_kept(tmp_path / "out")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("name", ["train.bin", "val.bin", "meta.json"])
def test_full_disk_is_one_line_naming_the_file(tmp_path, capsys, name):
    earlier_outputs(tmp_path / "out")
    os.symlink("/dev/full", tmp_path / "out" / f"{name}.tmp")  # every write there fails as on a full disk
    src = write(tmp_path / "in.txt", TEXT * 3)
    code, _, err = main(capsys, "--input", src, "--out_dir", tmp_path / "out", "--force")
    assert f"disk full: no space left for {tmp_path / 'out' / name}.tmp; free some" in one_line_error(
        code, err
    )
    assert_earlier_outputs_kept(tmp_path / "out")


def test_ctrl_c_is_one_line_exit_130_and_keeps_earlier_outputs(tmp_path):
    write(tmp_path / "big.txt", TEXT * 50_000)  # 8 MB: seconds of work on one thread
    earlier_outputs(tmp_path / "out")
    args = ["--input", tmp_path / "big.txt", "--out_dir", tmp_path / "out", "--force", "--workers", "1"]
    # a shell starts a background job with Ctrl-C ignored, which the child would inherit: restore it
    default_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    cmd = [sys.executable, SCRIPT, *map(str, args)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)
    deadline = time.time() + 60
    while (
        not (tmp_path / "out" / "train.bin.tmp").exists() and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.endswith(" MB")]  # progress may come first
    assert lines == [f"prepare_data: interrupted; {tmp_path / 'out'} is as it was"], err
    assert_earlier_outputs_kept(tmp_path / "out")


# ----------------------------------------------------------------------------- downloads, progress, help


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/{}.txt", "not-a-url-{}"])
def test_tinystories_offline_is_one_line_with_advice(tmp_path, capsys, monkeypatch, url):
    monkeypatch.setattr(pd, "TINYSTORIES", url)
    monkeypatch.chdir(tmp_path)
    code, _, err = main(capsys, "--dataset", "tinystories")
    line = one_line_error(code, err)
    assert line.startswith("prepare_data: error: download of") and "`python prepare_data.py` prepares" in line
    assert os.listdir(tmp_path) == []  # no half-made data/ folder, no .part file


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_tinystories_is_downloaded_once(tmp_path, capsys, monkeypatch):
    served = tmp_path / "served"
    write(served / "TinyStoriesV2-GPT4-train.txt", "Once" + EOT + "upon")
    write(served / "TinyStoriesV2-GPT4-valid.txt", "a time")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(
        pd, "TINYSTORIES", f"http://127.0.0.1:{server.server_port}/TinyStoriesV2-GPT4-{{}}.txt"
    )
    monkeypatch.chdir(tmp_path)
    try:
        code, out, err = main(capsys, "--dataset", "tinystories", "--workers", 2)
    finally:
        server.shutdown()
    assert code == 0, err
    assert sorted(os.listdir("data/tinystories")) == sorted(
        ["TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", *pd.OUTPUTS]
    )  # no .part left
    assert ids("data/tinystories", "train") == encode("Once" + EOT + "upon" + EOT)
    assert ids("data/tinystories", "val") == encode("a time" + EOT)
    # the server is gone: the next run uses what the first one downloaded
    code, out, err = main(capsys, "--dataset", "tinystories", "--out_dir", "again")
    assert code == 0 and "downloading" not in out, err
    assert ids("again", "val") == encode("a time" + EOT)


def test_progress_line_on_stderr_for_big_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pd, "CHUNK_CHARS", 1000)
    clock = iter(range(0, 10**6, 3))  # 3 s between two looks at the clock: as if each batch were slow
    monkeypatch.setattr(pd, "time", types.SimpleNamespace(time=lambda: next(clock)))
    src = write(tmp_path / "in.txt", TEXT * 100)
    code, _, err = main(capsys, "--input", src, "--out_dir", tmp_path / "out", "--workers", 1)
    assert code == 0
    progress = err.strip().splitlines()  # e.g. "0.3/1.2 MB": bytes done of all the input's
    assert len(progress) >= 10 and all(re.fullmatch(r"[\d,]+\.\d/[\d,]+\.\d MB", line) for line in progress)


def test_help_says_how_the_split_is_made(capsys):
    code, out, _ = main(capsys, "--help")
    text = " ".join(out.split())
    assert code == 0
    assert (
        "Without --val_input, val.bin gets the input's bytes after the first int(total * (1 - val_frac))"
        in text
    )
    assert "a .txt file is cut there" in text and "a record goes where it starts" in text
    assert "(default: 0.1)" in text and "None" not in text and "shared" not in text


def test_no_message_names_the_teams_shared_folder(tmp_path, capsys, monkeypatch):
    """The team's ../shared folder is on its machines only: what a user reads must not send them there.
    Read here: the help, a run's output, every refusal, the advice offline, the tokenizer's last resort."""
    monkeypatch.chdir(tmp_path)
    _, help_text, _ = main(capsys, "--help")
    _, done, _ = main(capsys, "--input", write(tmp_path / "book.txt", TEXT * 3))
    errors = [
        main(capsys, "--input", *a, "--out_dir", tmp_path / f"bad{i}")[2]
        for i, (a, _) in enumerate(bad_inputs(tmp_path))
    ]
    monkeypatch.setattr(pd, "TINYSTORIES", "http://127.0.0.1:9/{}.txt")
    errors.append(main(capsys, "--dataset", "tinystories")[2])

    def offline(*args):
        raise OSError("no network")

    monkeypatch.setattr(pd, "ASSETS", str(tmp_path / "assets_removed"))
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(pd.PrepareError) as no_tokenizer:
        pd.get_encoding.__wrapped__()
    errors.append(str(no_tokenizer.value))
    assert "next: " in done and all(errors), errors  # each of them was really printed
    for text in (help_text, done, *errors):
        assert "shared" not in text.replace(str(tmp_path), ""), text  # (this test's own folder aside)
