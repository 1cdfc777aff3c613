"""Tests for prepare_data.py: python -m pytest -q test_prepare_data.py"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

import tiktoken  # noqa: E402

import prepare_data as pd  # noqa: E402

ENC = tiktoken.get_encoding("gpt2")
EOT = "<|endoftext|>"
SCRIPT = os.path.join(HERE, "prepare_data.py")
SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")


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
    return ENC.decode_bytes(tokens).decode("utf-8")


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
    assert list(pd.iter_documents(str(root))) == [docs[name] for name in order]
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
    assert ids(out, "train").tolist() == ENC.encode_ordinary("one") + [50256] + ENC.encode_ordinary("two") + [50256]


def test_val_input_keeps_all_input_in_train(tmp_path):
    text, val_text = sample_text(seed=1), MULTIBYTE
    src, val = write(tmp_path / "in.txt", text), write(tmp_path / "val.txt", val_text)
    out = tmp_path / "out"
    meta = pd.prepare(src, str(out), val_input=val)
    # with default chunks a small file is one piece, so the tokens equal a whole-text encode
    assert ids(out, "train").tolist() == ENC.encode_ordinary(text) + [50256]
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
    assert ids(out, "train").tolist() == ENC.encode_ordinary(text) + [50256]


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="../shared/data not present")
def test_tinyshakespeare_real_text(tmp_path):
    text = open(SHAKESPEARE, encoding="utf-8").read()
    out = tmp_path / "out"
    meta = pd.prepare(SHAKESPEARE, str(out))
    assert text_of(out, "train", "val") == text + EOT
    assert_outputs_consistent(out)
    # 338,025 tokens for the whole text; chunk and split cuts may shift a handful
    assert abs(meta["train_tokens"] + meta["val_tokens"] - 338_026) <= 5
    assert 0.09 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.11


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
        ([str(tmp / "ok.txt"), "--val_input", str(tmp / "only_empty.jsonl")], "only_empty.jsonl: yields no text"),
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
        assert not out.exists() or os.listdir(out) == []


def test_error_midway_removes_temp_files(tmp_path):
    write(tmp_path / "books" / "a.txt", "good text " * 1000)
    write(tmp_path / "books" / "b.txt", b"more text \xff")
    out = tmp_path / "out"
    with pytest.raises(pd.PrepareError, match=r"b\.txt: not valid UTF-8 at byte offset 10"):
        pd.prepare(str(tmp_path / "books"), str(out), chunk_bytes=64)
    assert os.listdir(out) == []


def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def assert_one_line_error(proc, message):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data: error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("case", [0, 4, 5, 10])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    proc = run_cli("--input", *args, "--out_dir", str(out))
    assert_one_line_error(proc, message)
    assert not out.exists() or os.listdir(out) == []


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


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/input.txt", "not-a-url"])
def test_no_arguments_offline_fails_cleanly(tmp_path, monkeypatch, capsys, url):
    monkeypatch.setitem(pd.DATASETS["tinyshakespeare"], "train", url)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        pd.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare_data: error: download of") and "--input" in err[0]
    assert os.listdir(tmp_path) == []  # no half-made data/ folder or .part file


def test_no_arguments_uses_cached_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pd.DATASETS["tinyshakespeare"], "train", "http://127.0.0.1:9/input.txt")
    monkeypatch.chdir(tmp_path)
    text = sample_text(40)
    write(tmp_path / "data" / "tinyshakespeare" / "input.txt", text)
    pd.main(["--workers", "2"])
    out = tmp_path / "data" / "tinyshakespeare"
    assert text_of(out, "train", "val") == text + EOT
    assert sorted(os.listdir(out)) == ["input.txt", "meta.json", "train.bin", "val.bin"]
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
