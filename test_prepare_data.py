"""Tests for prepare_data.py: python -m pytest -q test_prepare_data.py"""

import errno
import functools
import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare_data as pd

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")  # present on the team's machines only; tests skip without it
EOT = "<|endoftext|>"
SCRIPT = os.path.join(HERE, "prepare_data.py")
SHAKESPEARE_GZ = os.path.join(HERE, "assets", "tinyshakespeare.txt.gz")
SHAKESPEARE_TOKENS = {"train": 301_966, "val": 36_060}  # 90/10 byte split of the 1,115,394 bytes


def enc():
    return pd.get_encoding()  # not at import: collecting the tests must need no tokenizer files


@functools.lru_cache(maxsize=None)
def shakespeare():
    with gzip.open(SHAKESPEARE_GZ, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def offline_env(tmp_path):
    """The environment of a user with no network and nothing in tiktoken's cache."""
    cache = tmp_path / "empty_tiktoken_cache"
    cache.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update({k: "http://127.0.0.1:9" for k in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY")})
    env["TIKTOKEN_CACHE_DIR"] = str(cache)  # else tiktoken may find files in the temp dir's data-gym-cache
    return env


def sample_text(n_lines=300, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "king", "said", "to", "his", "fool,", "and", "then", "went", "home.", "Why?", "\n"]
    return "".join(" ".join(rng.choice(words, 12)) + "\n" for _ in range(n_lines))


MULTIBYTE = "Café naïve 日本語のテキスト 🎉🐍 ẞ ok.\n" * 40


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(content)
    return str(path)


def ids(out_dir, split):
    return np.fromfile(os.path.join(out_dir, f"{split}.bin"), dtype=np.uint16)


def text_of(out_dir, *splits):
    # decode_bytes + strict decode: a split that cut a character would fail here
    tokens = np.concatenate([ids(out_dir, s) for s in splits]).tolist()
    return enc().decode_bytes(tokens).decode("utf-8")


def assert_outputs_consistent(out_dir):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert meta["eot_token"] == 50256 and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        assert meta[f"{split}_tokens"] == os.path.getsize(os.path.join(out_dir, f"{split}.bin")) // 2 > 0
    assert sorted(os.listdir(out_dir)) == ["meta.json", "train.bin", "val.bin"]  # no .tmp left
    return meta


# ----------------------------------------------------------------------------- round trips

def test_txt_round_trip_and_exact_split(tmp_path):
    text = sample_text()
    src = write(tmp_path / "in.txt", text)
    out = tmp_path / "out"
    meta = pd.prepare(src, str(out), val_frac=0.1)
    assert text_of(out, "train", "val") == text + EOT
    meta_on_disk = assert_outputs_consistent(out)
    assert meta == meta_on_disk and meta["val_frac"] == 0.1 and meta["source"] == src
    # ASCII text: the split lands on the exact byte, and the document's EOT ends val
    total = len(text.encode())
    assert len(text_of(out, "train")) == int(total * 0.9)
    assert len(text_of(out, "val")) == total - int(total * 0.9) + len(EOT)
    assert 0.08 < len(ids(out, "val")) / (len(ids(out, "train")) + len(ids(out, "val"))) < 0.12


def test_folder_is_recursive_sorted_and_skips_other_files(tmp_path):
    root = tmp_path / "books"
    docs = {"b.txt": "Bravo " * 200, "a.txt": "Alpha\n" * 200, "z.txt": "Zulu é " * 100,
            "sub/c.txt": "Charlie 日本\n" * 100, "sub/deeper/d.txt": "Delta 🎉\n" * 100}
    for name, content in docs.items():
        write(root / name, content)
    write(root / "empty.txt", "")  # an empty document adds nothing, not even an EOT
    write(root / "notes.md", "not text for training")
    order = ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt", "z.txt"]
    out = tmp_path / "out"
    pd.prepare(str(root), str(out), chunk_bytes=64)
    assert text_of(out, "train", "val") == "".join(docs[name] + EOT for name in order)
    assert_outputs_consistent(out)


def test_jsonl_round_trip_splits_between_records(tmp_path):
    texts = [f"Record {i}: a \"quoted\" line,\nthen Ünïcödé 日本 {i}.\n" * (1 + i % 3) for i in range(40)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    lines.insert(5, json.dumps({"text": ""}))  # empty documents are skipped
    lines.insert(9, "   ")  # blank lines too
    src = write(tmp_path / "wiki.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    pd.prepare(src, str(out))
    assert text_of(out, "train", "val") == "".join(t + EOT for t in texts)
    # records are never cut: val is a whole number of trailing records
    val = text_of(out, "val")
    n_val = val.count(EOT)
    assert val == "".join(t + EOT for t in texts[-n_val:]) and 2 <= n_val <= 6
    assert_outputs_consistent(out)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64])
def test_multibyte_text_and_markers_survive_tiny_chunks(tmp_path, chunk_bytes):
    text = MULTIBYTE + EOT + "second story ✨" + EOT + "\nthird\n"
    src = write(tmp_path / "in.txt", text)
    out = tmp_path / "out"
    pd.prepare(src, str(out), chunk_bytes=chunk_bytes)
    assert text_of(out, "train", "val") == text + EOT
    all_ids = np.concatenate([ids(out, "train"), ids(out, "val")])
    assert (all_ids == pd.EOT_ID).sum() == 3  # two markers + the document end, even across chunk cuts
    assert text_of(out, "train").encode() + text_of(out, "val").encode() == (text + EOT).encode()


def test_split_point_inside_multibyte_characters(tmp_path):
    text = "日本🎉é" * 50
    src = write(tmp_path / "in.txt", text)
    total = len(text.encode())
    for i, val_frac in enumerate([0.1, 0.101, 0.102, 0.103, 0.137]):
        out = tmp_path / f"out{i}"
        pd.prepare(src, str(out), val_frac=val_frac, chunk_bytes=7)
        train = text_of(out, "train")  # decodes on its own: the cut fell on a character boundary
        assert 0 <= int(total * (1 - val_frac)) - len(train.encode()) <= 3
        assert train + text_of(out, "val") == text + EOT


def test_eot_marker_is_one_token_not_characters(tmp_path):
    src = write(tmp_path / "in.txt", "one" + EOT + "two")
    val = write(tmp_path / "val.txt", "three")
    out = tmp_path / "out"
    pd.prepare(src, str(out), val_input=val)
    one, two = enc().encode_ordinary("one"), enc().encode_ordinary("two")
    assert ids(out, "train").tolist() == one + [50256] + two + [50256]


def test_val_input_keeps_all_input_in_train(tmp_path):
    text, val_text = sample_text(seed=1), MULTIBYTE
    src, val = write(tmp_path / "in.txt", text), write(tmp_path / "val.txt", val_text)
    out = tmp_path / "out"
    meta = pd.prepare(src, str(out), val_input=val)
    # with default chunks a small file is one piece, so the tokens equal a whole-text encode
    assert ids(out, "train").tolist() == enc().encode_ordinary(text) + [50256]
    assert text_of(out, "val") == val_text + EOT
    assert meta["val_source"] == val and meta["val_frac"] is None
    assert_outputs_consistent(out)


@pytest.mark.parametrize("chunk_bytes", [100, 4096])
def test_chunk_cuts_give_whole_text_tokens(tmp_path, chunk_bytes):
    text = "".join(f"Line {i}: the king said to his fool, and then went home.\n" for i in range(200))
    text += "".join(f"  INDEX, entry {i}.\n\n" for i in range(100)) + MULTIBYTE  # no "x\ny" here
    src, val = write(tmp_path / "in.txt", text), write(tmp_path / "val.txt", "v")
    out = tmp_path / "out"
    pd.prepare(src, str(out), val_input=val, chunk_bytes=chunk_bytes)
    assert ids(out, "train").tolist() == enc().encode_ordinary(text) + [50256]


def test_shipped_tinyshakespeare_is_char_rnns_input_txt():
    data = shakespeare().encode()
    assert len(data) == 1_115_394
    sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # assets/README.md
    assert hashlib.sha256(data).hexdigest() == sha256
    shared = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
    if os.path.exists(shared):
        assert open(shared, "rb").read() == data


def test_tinyshakespeare_real_text(tmp_path):
    out = tmp_path / "out"
    meta = pd.prepare_tinyshakespeare(str(out))
    assert text_of(out, "train", "val") == shakespeare() + EOT
    assert_outputs_consistent(out)
    # 338,025 tokens for the whole text, + 1 end-of-text; the 90/10 split cut costs nothing here
    assert {split: meta[f"{split}_tokens"] for split in ("train", "val")} == SHAKESPEARE_TOKENS
    assert meta["source"] == "assets/tinyshakespeare.txt.gz"


def test_force_overwrites(tmp_path):
    src = write(tmp_path / "in.txt", sample_text(50))
    out = tmp_path / "out"
    pd.prepare(src, str(out))
    write(src, sample_text(80, seed=3))
    pd.prepare(src, str(out), force=True)
    assert text_of(out, "train", "val") == sample_text(80, seed=3) + EOT


def test_safe_cut():
    buf = "aé日🎉".encode()  # 1 + 2 + 3 + 4 bytes
    assert [pd.safe_cut(buf, k) for k in range(len(buf) + 1)] == [0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10]
    marked = b"ab" + pd.EOT_BYTES + b"cd"
    assert [pd.safe_cut(marked, k) for k in range(2, 16)] == [2] * 13 + [15]


def test_token_cut():
    buf = b"one two\nthree  \nfour\n\nfive six\nseven"
    assert pd.token_cut(buf, len(buf) - 2) == buf.index(b"seven")
    assert pd.token_cut(buf, buf.index(b"seven") - 1) == buf.index(b" six")
    assert pd.token_cut(buf, buf.index(b"four") + 2) == buf.index(b"three")  # not after "  \n"
    assert pd.token_cut(b"a  \n\n  b", 7) == 7  # only whitespace runs: keep the cut
    assert pd.token_cut(buf, 2) == 2


# ----------------------------------------------------------------------------- bad input

def bad_inputs(tmp):
    """(args, expected message part) for inputs prepare must refuse."""
    write(tmp / "empty.txt", "")
    os.makedirs(tmp / "no_txt")
    write(tmp / "no_txt" / "readme.md", "hi")
    write(tmp / "all_empty" / "a.txt", "")
    write(tmp / "latin1.txt", b"plain ascii, then caf\xe9 au lait")  # the bad byte is at offset 21
    write(tmp / "bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n')
    write(tmp / "no_text.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"body": "x"}\n')
    write(tmp / "not_str.jsonl", '{"text": ["a"]}\n')
    write(tmp / "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # 15 + 13 bytes before it
    write(tmp / "only_empty.jsonl", '{"text": ""}\n\n')
    write(tmp / "one.jsonl", '{"text": "a single record cannot be split"}\n')
    write(tmp / "ok.txt", "fine text\n" * 10)
    return [
        ([str(tmp / "missing.txt")], "missing.txt: no such file"),
        ([str(tmp / "empty.txt")], "empty.txt: empty file"),
        ([str(tmp / "no_txt")], "no .txt files"),
        ([str(tmp / "all_empty")], "all .txt files are empty"),
        ([str(tmp / "latin1.txt")], "latin1.txt: not valid UTF-8 at byte offset 21"),
        ([str(tmp / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
        ([str(tmp / "no_text.jsonl")], 'no_text.jsonl:3: no "text" string'),
        ([str(tmp / "not_str.jsonl")], 'not_str.jsonl:1: no "text" string'),
        ([str(tmp / "latin1.jsonl")], "latin1.jsonl:2: not valid UTF-8 at byte offset 28"),
        ([str(tmp / "only_empty.jsonl")], "yields no text"),
        ([str(tmp / "one.jsonl")], "leaves val empty"),
        ([str(tmp / "ok.txt"), "--val_input", str(tmp / "missing.txt")], "missing.txt: no such file"),
        ([str(tmp / "ok.txt"), "--val_input", str(tmp / "only_empty.jsonl")],
         "only_empty.jsonl: yields no text"),
        ([str(tmp / "ok.txt"), "--val_frac", "1.5"], "--val_frac must be between 0 and 1"),
    ]


def call_prepare(args, out_dir, **kw):
    val_input = args[args.index("--val_input") + 1] if "--val_input" in args else None
    val_frac = float(args[args.index("--val_frac") + 1]) if "--val_frac" in args else 0.1
    return pd.prepare(args[0], out_dir, val_input=val_input, val_frac=val_frac, **kw)


def test_bad_inputs_raise_and_leave_no_files(tmp_path):
    for args, message in bad_inputs(tmp_path):
        out = tmp_path / "out"
        with pytest.raises(pd.PrepareError, match=message.replace("(", r"\(")):
            call_prepare(args, str(out), chunk_bytes=7)  # tiny chunks: offsets must still be exact
        assert not out.exists()  # not even an empty folder


def test_error_midway_removes_temp_files(tmp_path):
    write(tmp_path / "books" / "a.txt", "good text " * 1000)
    write(tmp_path / "books" / "b.txt", b"more text \xff")
    out = tmp_path / "out"
    with pytest.raises(pd.PrepareError, match=r"b\.txt: not valid UTF-8 at byte offset 10"):
        pd.prepare(str(tmp_path / "books"), str(out), chunk_bytes=64)
    assert not out.exists()


def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def assert_one_line_error(proc, message):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data: error: "), proc.stderr
    assert message in lines[0], proc.stderr


@pytest.mark.parametrize("case", [0, 4, 5, 10])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    proc = run_cli("--input", *args, "--out_dir", str(out))
    assert_one_line_error(proc, message)
    assert not out.exists()


def test_cli_refuses_existing_output_without_force(tmp_path):
    src = write(tmp_path / "in.txt", sample_text(50))
    out = tmp_path / "out"
    write(out / "train.bin", b"old tokens")
    proc = run_cli("--input", src, "--out_dir", str(out))
    assert_one_line_error(proc, "train.bin already exists (pass --force")
    assert open(out / "train.bin", "rb").read() == b"old tokens"
    assert os.listdir(out) == ["train.bin"]
    proc = run_cli("--input", src, "--out_dir", str(out), "--force", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "val:" in proc.stdout
    assert text_of(out, "train", "val") == sample_text(50) + EOT


def test_default_out_dir_is_data_slash_input_name(tmp_path):
    src = write(tmp_path / "poems.txt", sample_text(30))
    proc = run_cli("--input", src, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_outputs_consistent(tmp_path / "data" / "poems")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/{}.txt", "not-a-url-{}"])
def test_tinystories_offline_fails_cleanly_with_advice_that_works(tmp_path, monkeypatch, capsys, url):
    monkeypatch.setattr(pd, "TINYSTORIES", url)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        pd.main(["--dataset", "tinystories"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare_data: error: download of"), err
    # the advice: the plain command (test_default_run_offline_with_an_empty_tiktoken_cache runs it)
    assert "`python prepare_data.py` prepares the Tiny Shakespeare" in err[0] and "--input PATH" in err[0]
    assert "shared" not in err[0]
    assert os.listdir(tmp_path) == []  # no half-made data/ folder or .part file


def test_tinystories_uses_cached_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pd, "TINYSTORIES", "http://127.0.0.1:9/TinyStoriesV2-GPT4-{}.txt")
    monkeypatch.chdir(tmp_path)
    text, val_text = sample_text(40), sample_text(5, seed=2)
    write(tmp_path / "data" / "tinystories" / "TinyStoriesV2-GPT4-train.txt", text)
    write(tmp_path / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.txt", val_text)
    pd.main(["--dataset", "tinystories", "--workers", "2"])
    out = tmp_path / "data" / "tinystories"
    assert text_of(out, "train") == text + EOT and text_of(out, "val") == val_text + EOT
    assert "train:" in capsys.readouterr().out


def test_crash_midway_keeps_previous_outputs(tmp_path, monkeypatch):
    src = write(tmp_path / "in.txt", sample_text(200))
    out = tmp_path / "out"
    pd.prepare(src, str(out))
    before = {name: open(out / name, "rb").read() for name in os.listdir(out)}
    calls = []
    real_encode = pd.encode_pieces

    def failing_encode(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_encode(*args)

    monkeypatch.setattr(pd, "encode_pieces", failing_encode)
    with pytest.raises(RuntimeError):
        pd.prepare(src, str(out), force=True, chunk_bytes=64, workers=1)
    assert {name: open(out / name, "rb").read() for name in os.listdir(out)} == before  # no .tmp either


# ----------------------------------------------------------------------------- offline first run

def test_default_run_offline_with_an_empty_tiktoken_cache(tmp_path):
    """A fresh clone, no network, nothing cached: `python prepare_data.py` works on the first try."""
    env = offline_env(tmp_path)
    proc = subprocess.run([sys.executable, SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "tinyshakespeare"
    meta = assert_outputs_consistent(out)
    assert {s: meta[f"{s}_tokens"] for s in ("train", "val")} == SHAKESPEARE_TOKENS
    assert os.listdir(env["TIKTOKEN_CACHE_DIR"]) == []  # the shipped tokenizer files left no copies there
    # exactly the tokens of --input on the same text
    write(tmp_path / "shakespeare.txt", shakespeare())
    proc = subprocess.run([sys.executable, SCRIPT, "--input", "shakespeare.txt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "data" / "shakespeare" / name).read_bytes() == (out / name).read_bytes()


def tiktoken_reference(monkeypatch):
    """tiktoken's own gpt2, from the team's offline copy of its cache or a filled default cache."""
    import tiktoken

    shared_cache = os.path.join(SHARED, "tiktoken_cache")
    if os.path.isdir(shared_cache):
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", shared_cache)
    elif not pd.tiktoken_has_gpt2():
        pytest.skip("tiktoken's own gpt2 files are not available offline here")
    return tiktoken.get_encoding("gpt2")


def test_shipped_tokenizer_files_give_tiktokens_gpt2(monkeypatch):
    shipped, real = pd.gpt2_from_assets(), tiktoken_reference(monkeypatch)  # the fallback, forced
    assert shipped is not real
    assert (shipped.name, shipped.n_vocab, shipped.eot_token) == ("gpt2", 50257, 50256)
    text = shakespeare()
    ids = shipped.encode_ordinary(text)
    assert ids == real.encode_ordinary(text) and len(ids) == 338_025
    assert shipped.decode(ids) == real.decode(ids) == text
    special = "Once upon a time" + EOT + "The end.\n" + MULTIBYTE + EOT
    ids = shipped.encode(special, allowed_special={EOT})
    assert ids == real.encode(special, allowed_special={EOT}) and ids.count(50256) == 2
    assert shipped.decode(ids) == real.decode(ids) == special
    with pytest.raises(ValueError):  # like tiktoken's, a marker in plain text is refused by default
        shipped.encode(special)


def test_get_encoding_offline_uses_the_shipped_files_without_trying_the_network(tmp_path, monkeypatch):
    import tiktoken

    def download(*args):
        raise AssertionError("tiktoken would download here: offline that may hang for minutes")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken, "get_encoding", download)
    enc = pd.get_encoding.__wrapped__()  # not the cached result of an earlier call
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert os.listdir(tmp_path) == [] and os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path)


def test_no_tokenizer_anywhere_is_one_line_saying_what_to_do(tmp_path):
    """prepare_data.py copied away from assets/, offline, empty cache: no traceback, no hang."""
    shutil.copy(SCRIPT, tmp_path / "prepare_data.py")
    write(tmp_path / "book.txt", sample_text(20))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "prepare_data.py", "--input", "book.txt"], cwd=tmp_path,
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "cannot load the gpt2 tokenizer")
    assert f"restore {tmp_path / 'assets'} from the patchgpt repository" in proc.stderr
    assert "connect to the internet" in proc.stderr and time.time() - t0 < 30
    assert not (tmp_path / "data").exists()


def test_cli_input_prints_the_command_that_trains_on_it(tmp_path):
    write(tmp_path / "book.txt", sample_text(30))
    proc = run_cli("--input", "book.txt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("next: ")
    python, script, *rest = shlex.split(last[len("next: "):])
    # followed literally, here: an interpreter on PATH, patchgpt.py, the folder just written
    assert shutil.which(python) and os.path.samefile(tmp_path / script, os.path.join(HERE, "patchgpt.py"))
    assert rest == ["--data_dir", "data/book"] and (tmp_path / "data" / "book" / "train.bin").exists()


def test_no_message_names_the_teams_shared_folder():
    assert "shared" not in open(SCRIPT, encoding="utf-8").read()


# ----------------------------------------------------------------------------- failures midway

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("name", ["train.bin", "val.bin", "meta.json"])
def test_full_disk_is_one_line_naming_the_file_and_keeps_earlier_outputs(tmp_path, name):
    src = write(tmp_path / "in.txt", sample_text(50))
    out = tmp_path / "out"
    for old in pd.OUTPUTS:
        write(out / old, b"earlier " + old.encode())
    os.symlink("/dev/full", out / f"{name}.tmp")  # every write there fails with ENOSPC, as on a full disk
    proc = run_cli("--input", src, "--out_dir", str(out), "--force")
    assert_one_line_error(proc, f"disk full: no space left for {out / name}; free some space")
    assert sorted(os.listdir(out)) == sorted(pd.OUTPUTS)  # the .tmp is gone
    assert all((out / old).read_bytes() == b"earlier " + old.encode() for old in pd.OUTPUTS)


def test_full_disk_in_a_write_becomes_a_prepare_error(tmp_path, monkeypatch):
    src = write(tmp_path / "in.txt", sample_text(50))

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.json, "dump", full)
    with pytest.raises(pd.PrepareError, match=r"^disk full: no space left for .*meta\.json; free some"):
        pd.prepare(src, str(tmp_path / "data" / "in"))
    assert os.listdir(tmp_path) == ["in.txt"]  # no new folders, no .tmp


def test_ctrl_c_is_one_line_exit_130_and_keeps_earlier_outputs(tmp_path):
    write(tmp_path / "big.txt", sample_text(2000) * 50)  # ~6 MB: seconds of work on one thread
    out = tmp_path / "out"
    for old in pd.OUTPUTS:
        write(out / old, b"earlier " + old.encode())
    args = ["--input", str(tmp_path / "big.txt"), "--out_dir", str(out), "--force", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not (out / "train.bin.tmp").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if " MB/s" not in line]  # progress may come first
    assert lines == [f"prepare_data: interrupted; {out} is as it was"], err
    assert sorted(os.listdir(out)) == sorted(pd.OUTPUTS)
    assert all((out / old).read_bytes() == b"earlier " + old.encode() for old in pd.OUTPUTS)


def test_content_failure_leaves_no_new_folder_but_keeps_existing_ones(tmp_path):
    write(tmp_path / "only_empty.jsonl", '{"text": ""}\n')
    proc = run_cli("--input", "only_empty.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, "only_empty.jsonl: yields no text")
    assert os.listdir(tmp_path) == ["only_empty.jsonl"]  # no data/only_empty/, no data/
    (tmp_path / "data").mkdir()  # folders that were there before stay, even when empty
    assert_one_line_error(run_cli("--input", "only_empty.jsonl", cwd=tmp_path), "yields no text")
    assert os.listdir(tmp_path / "data") == []
    (tmp_path / "data" / "only_empty").mkdir()
    assert_one_line_error(run_cli("--input", "only_empty.jsonl", cwd=tmp_path), "yields no text")
    assert os.listdir(tmp_path / "data") == ["only_empty"]


def test_help_shows_the_real_defaults():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(default: data/<dataset or input name>, e.g. data/tinyshakespeare)" in text
    assert f"(default: {os.cpu_count()}, the number of CPUs)" in text
    assert "(default: 0.1)" in text and "tinyshakespeare (the default)" in text
    assert "None" not in text and "(default: )" not in text and "shared" not in text
