"""The data every test trains on, shared by the test files."""

import gzip
import os

import numpy as np
import pytest

from prepare_data import get_encoding

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """train.bin/val.bin: the first 200k characters of the shipped Tiny Shakespeare in gpt2 tokens."""
    d = tmp_path_factory.mktemp("data")
    with gzip.open(os.path.join(HERE, "assets", "tinyshakespeare.txt.gz"), "rt", encoding="utf-8") as f:
        tokens = np.array(get_encoding().encode_ordinary(f.read()[:200_000]), dtype=np.uint16)
    split = int(0.9 * len(tokens))
    tokens[:split].tofile(d / "train.bin")
    tokens[split:].tofile(d / "val.bin")
    return d
