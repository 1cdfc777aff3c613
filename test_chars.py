"""Tests of the character-level path (pytest, CPU): prepare_data.py --chars, training on characters,
resume and sampling, and the refusals of data and checkpoints from another vocabulary."""

import gzip
import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

import guards
import patchgpt as P
import prepare_data
import sample
from conftest import HERE, write_meta
from test_patchgpt import TINY, quiet, refused, tiny_cli, tiny_train_config


def decode(folder, name):
    chars = json.loads((folder / "meta.json").read_text())["chars"]
    return "".join(chars[i] for i in np.fromfile(folder / name, dtype=np.uint16))


def test_chars_of_the_shipped_tiny_shakespeare_are_nanogpts_shakespeare_char(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prepare_data.main(["--chars"])
    out = tmp_path / "data" / "tinyshakespeare_char"
    assert "next: " in capsys.readouterr().out
    with gzip.open(os.path.join(HERE, "assets", "tinyshakespeare.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    cut = len(text.encode()[: int(0.9 * len(text.encode()))].decode(errors="ignore"))  # the 90/10 byte split
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "chars" and meta["chars"] == "".join(sorted(set(text[:cut])))
    assert meta["vocab_size"] == 65 and meta["train_tokens"] == cut == 1_003_854  # nanoGPT's counts
    assert decode(out, "train.bin") == text[:cut] and decode(out, "val.bin") == text[cut:]


def test_chars_of_a_folder_and_a_val_input_and_the_dropped_unknown_characters(tmp_path, capsys):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("ab\n<|endoftext|>é\n")
    (tmp_path / "books" / "b.txt").write_text("ba c\n")
    (tmp_path / "val.txt").write_text("cab é")
    out = tmp_path / "out"
    args = f"--chars --input {tmp_path}/books --val_input {tmp_path}/val.txt --out_dir {out}".split()
    prepare_data.main(args)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chars"] == "\n abcé" and meta["val_dropped"] == 0  # documents joined, no mark
    assert decode(out, "train.bin") == "ab\né\nba c\n" and decode(out, "val.bin") == "cab é"
    capsys.readouterr()
    # characters the training text lacks: dropped from val.bin and counted, not a refusal
    (tmp_path / "val.txt").write_text("a!bz!")
    prepare_data.main(args + ["--force"])
    meta = json.loads((out / "meta.json").read_text())
    assert decode(out, "val.bin") == "ab" and (meta["val_dropped"], meta["val_dropped_chars"]) == (3, "!z")
    assert meta["val_tokens"] == 2 and meta["chars"] == "\n abcé"  # the training text's vocabulary
    assert (
        "val: dropped 3 characters that the training text lacks (2 distinct: '!z')" in capsys.readouterr().out
    )


def stop_at(marker):
    """A log that sends this process a SIGTERM when it prints marker: the run saves and stops there."""

    def log(line):
        if marker in line:
            os.kill(os.getpid(), signal.SIGTERM)

    return log


def test_a_character_run_trains_resumes_exactly_and_samples_characters(char_dir, tmp_path):
    vocab = json.loads((char_dir / "meta.json").read_text())
    tc = tiny_train_config(char_dir, tmp_path / "whole", tokens=16 * 16 * 16)
    whole = P.train(TINY, tc, log=quiet)
    ckpt = guards.load_checkpoint(str(tmp_path / "whole" / "ckpt.pt"))
    assert ckpt["model"]["lm_head.weight"].shape == (vocab["vocab_size"], TINY.n_embd)  # one row a character
    assert ckpt["model_config"]["vocab_size"] == vocab["vocab_size"] == len(vocab["chars"])
    hist = whole["history"]
    # from a uniform guess over the characters (log V) to well below it
    assert (
        hist[0]["val_loss"] > np.log(vocab["vocab_size"]) - 0.1
        and hist[-1]["val_loss"] < np.log(vocab["vocab_size"]) - 0.5
    )

    stopped = replace(tc, out_dir=str(tmp_path / "stopped"))
    with pytest.raises(KeyboardInterrupt):
        P.train(TINY, stopped, log=stop_at("token K=1 step 3/"))
    resumed = P.train(TINY, replace(stopped, resume=True), log=quiet)
    assert resumed["history"] == hist  # the same evaluations, bit for bit
    weights = guards.load_checkpoint(os.path.join(stopped.out_dir, "ckpt.pt"))["model"]
    assert all(torch.equal(weights[k], v) for k, v in ckpt["model"].items())

    texts = sample.sample(tc.out_dir, "ROMEO:", 2, 30, 1.0, 10, "cpu", 0, log=quiet)
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 30 for t in texts)
    assert set("".join(texts)) <= set(vocab["chars"])
    assert len(sample.sample(tc.out_dir, "", 1, 5, log=quiet)[0]) == 1 + 5  # from the first character


def test_data_and_checkpoints_of_another_vocabulary_are_one_line(char_dir, data_dir, tmp_path, capsys):
    def check(data, *words, extra=()):
        out = tmp_path / "out"
        result = refused(capsys, tiny_cli(data, out, "--tokens", "1024", *extra))
        assert all(w in result.stderr for w in words), result.stderr
        assert not out.exists()  # nothing made, nothing overwritten

    check(char_dir, "another vocabulary", extra=("--val_bin", str(data_dir / "val.bin")))
    bad = tmp_path / "bad"
    bad.mkdir()
    np.arange(3000, dtype=np.uint16).tofile(bad / "train.bin")  # ids up to 2999
    np.arange(3000, dtype=np.uint16).tofile(bad / "val.bin")
    check(bad, "meta.json not found")
    for foreign in ("not json", '{"tokenizer": "bpe", "vocab_size": 3000}', '{"tokenizer": "chars"}', "[1]"):
        (bad / "meta.json").write_text(foreign)
        check(bad, "is not a meta.json of prepare_data.py")
    write_meta(bad, {"tokenizer": "chars", "vocab_size": 3, "chars": "abc"})
    check(bad, "token id 2999 >= 3", "beyond")

    gpt2_run = tmp_path / "gpt2"  # a GPT-2 run cannot go on in characters, nor sample from a prompt's é
    P.main(tiny_cli(data_dir, gpt2_run, "--tokens", "1024")[2:])
    check(char_dir, "vocab_size", extra=("--out_dir", str(gpt2_run), "--resume"))
    char_run = tmp_path / "chars"
    P.main(tiny_cli(char_dir, char_run, "--tokens", "1024")[2:])
    result = refused(capsys, ["python", "sample.py", "--out_dir", str(char_run), "--prompt", "Ω!"])
    assert "--prompt: characters that are not in the vocabulary: 'Ω'" in result.stderr


def test_a_checkpoint_from_before_character_data_resumes_and_samples_as_gpt2(data_dir, tmp_path):
    tc = tiny_train_config(data_dir, tmp_path / "run", tokens=16 * 16 * 6)
    done = P.train(TINY, tc, log=quiet)
    path = os.path.join(tc.out_dir, "ckpt.pt")
    ckpt = guards.load_checkpoint(path)
    del ckpt["model_config"]["vocab_size"], ckpt["vocab"]  # as saved before either existed
    torch.save(ckpt, path)
    assert P.train(TINY, replace(tc, resume=True), log=quiet)["val_loss"] == done["val_loss"]
    text = sample.sample(tc.out_dir, "ROMEO:", 1, 5, log=quiet)[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
