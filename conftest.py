"""The data every test trains on, shared by the test files."""

import gzip
import json
import os

import numpy as np
import pytest

from prepare_data import get_encoding, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257}  # what prepare_data.py's meta.json says of gpt2 ids


def shakespeare(n_chars=200_000):
    with gzip.open(os.path.join(HERE, "assets", "tinyshakespeare.txt.gz"), "rt", encoding="utf-8") as f:
        return f.read()[:n_chars]


def write_meta(folder, meta=GPT2_META):
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """train.bin/val.bin: the first 200k characters of the shipped Tiny Shakespeare in gpt2 tokens."""
    d = tmp_path_factory.mktemp("data")
    tokens = np.array(get_encoding().encode_ordinary(shakespeare()), dtype=np.uint16)
    split = int(0.9 * len(tokens))
    tokens[:split].tofile(d / "train.bin")
    tokens[split:].tofile(d / "val.bin")
    write_meta(d)
    return d


@pytest.fixture(scope="session")
def char_dir(tmp_path_factory):
    """The same 200k characters prepared by prepare_data.py --chars: one id per character."""
    d = tmp_path_factory.mktemp("chars")
    (d / "text.txt").write_text(shakespeare(), encoding="utf-8")
    prepare(str(d / "text.txt"), str(d / "data"), chars=True)
    return d / "data"
