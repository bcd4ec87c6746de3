"""``--data tfds:NAME[:SPLIT]``: TensorFlow Datasets as a document source (extra ``tfds``).

Mostly ``tfds.testing.mock_data`` (no download; reads go through ``as_data_source``, which the mock
replaces), plus one tiny dataset really prepared as ArrayRecord and read back. None needs TensorFlow.
"""

import json
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from longrope_jax import cli  # noqa: E402
from longrope_jax.jobs import ppl as ppl_job  # noqa: E402
from longrope_jax.data import DataError, read_documents, windows  # noqa: E402
from longrope_jax.data import documents  # noqa: E402

from tiny import make_hf_dir  # noqa: E402

BOOKS = [("A short book.", 1), ("The quick brown fox jumps over the lazy dog. " * 20, 2),
         ("It was the best of times, it was the worst of times. " * 30, 3), ("Ab" * 400, 4)]


class CharTok:
    def encode(self, text):
        return [ord(c) % 256 for c in text]


def _pg19(split, books=BOOKS):
    return [{"book_text": text, "book_id": np.int32(i), "book_title": f"Book {i}",
             "publication_date": "1900", "book_link": f"https://example.org/{i}", "split": split}
            for text, i in books]


@pytest.fixture
def mock_pg19():
    """pg19 with known books; records the splits asked for."""
    asked = []

    def as_data_source(self, split=None, **kwargs):
        asked.append(split)
        return _pg19(split)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        yield asked


def test_pg19_validation_yields_the_mocked_books(mock_pg19):
    docs = read_documents("tfds:pg19:validation")
    assert mock_pg19 == ["validation"]
    assert [d.text for d in docs] == [t for t, _ in BOOKS]
    assert [d.name for d in docs] == [f"tfds:pg19:validation:{i}" for i in range(len(BOOKS))]


def test_default_split_field_and_max_documents(mock_pg19):
    logs = []
    docs = read_documents("tfds:pg19", max_documents=2, log=logs.append)
    assert mock_pg19 == ["validation"] and [d.name for d in docs] == ["tfds:pg19:validation:0", "tfds:pg19:validation:1"]
    assert any("'book_text'" in m for m in logs)  # pg19 has no "text" feature: book_text is chosen and said
    assert any("first 2 of 4" in m for m in logs)
    assert read_documents("tfds:pg19:test", field="book_title")[3].text == "Book 4"
    assert read_documents("tfds:pg19:validation[:2]")[0].name == "tfds:pg19:validation[:2]:0"
    assert mock_pg19[-1] == "validation[:2]"


def test_windows_on_tfds_documents(mock_pg19):
    docs = read_documents("tfds:pg19:validation")
    w = windows(docs, CharTok(), 64, 2, seed=0, source="tfds:pg19:validation")
    assert w.tokens.shape == (2, 64) and w.skipped_short == 1 and w.available == 3
    for row, name in zip(w.tokens, w.documents):
        text = docs[int(name.rsplit(":", 1)[1])].text
        assert "".join(map(chr, row.tolist())) == text[:64]
    with pytest.raises(DataError, match=r"tfds:pg19:validation: expected 4 document\(s\) of at least 64 tokens, "
                                        r"found 3 \(1 shorter"):
        windows(docs, CharTok(), 64, 4, source="tfds:pg19:validation")


def test_random_mock_examples_through_array_record_source():
    """The mock's own generator goes through TFDS's ArrayRecordDataSource (the real read path)."""
    with tfds.testing.mock_data(num_examples=7):
        docs = read_documents("tfds:pg19:validation", max_documents=5)
    assert [d.name for d in docs] == [f"tfds:pg19:validation:{i}" for i in range(5)]
    assert all(isinstance(d.text, str) and d.text for d in docs)
    with tfds.testing.mock_data(num_examples=3):
        logs = []
        assert len(read_documents("tfds:imdb_reviews:test", log=logs.append)) == 3  # has a "text" feature
        read_documents("tfds:scientific_papers/arxiv:test", log=logs.append)  # three Text features
        assert [m for m in logs if "feature" in m] == ["tfds:scientific_papers/arxiv:test: reading feature 'article' "
                        "(scientific_papers/arxiv has no 'text' feature)"]


def test_run_ppl_and_cli_on_tfds(tmp_path, mock_pg19, capsys):
    d = make_hf_dir(str(tmp_path), max_position_embeddings=64)
    recs = list(ppl_job.run(d, "tfds:pg19:validation", [48], ["none", "yarn:2"], samples=2))
    assert len(recs) == 2 and all(np.isfinite(r["ppl"]) for r in recs)
    assert recs[0]["documents_available"] == 3 and recs[0]["documents_skipped_short"] == 1
    assert all(n.startswith("tfds:pg19:validation:") for n in recs[0]["documents"])
    rc = cli.main(["ppl", "--model", d, "--data", "tfds:pg19:validation", "--length", "48", "--samples", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.splitlines()[0])["ppl"] == pytest.approx(recs[0]["ppl"], rel=1e-5)


def test_split_choice_and_errors(monkeypatch):
    def fake_splits(names):
        monkeypatch.setattr(tfds.core.DatasetInfo, "splits", property(lambda self: {s: None for s in names}))

    asked = []
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split=None, **kw: asked.append(split) or _pg19(split)):
        fake_splits(["train", "test"])
        logs = []
        docs = read_documents("tfds:pg19", log=logs.append)
        assert asked == ["test"] and docs[0].name == "tfds:pg19:test:0"
        assert any("no 'validation' split; reading 'test'" in m for m in logs)
        with pytest.raises(DataError, match=r"tfds:pg19:valid: pg19 has no split 'valid' \(splits: test, train\)"):
            read_documents("tfds:pg19:valid")
        read_documents("tfds:pg19:train[:10%]+test")
        assert asked[-1] == "train[:10%]+test"
        fake_splits(["train"])
        read_documents("tfds:pg19")
        assert asked[-1] == "train"
        with pytest.raises(DataError, match=r"no string feature 'nope'; pass --field with one of: book_text, "
                                            r"book_title, publication_date, book_link \(features: book_text \(Text\), "
                                            r"book_id \(Tensor int32\)"):
            read_documents("tfds:pg19:train", field="nope")
        with pytest.raises(DataError, match="feature 'book_id' is not text"):
            read_documents("tfds:pg19:train", field="book_id")
        with pytest.raises(DataError, match="no string feature 'text'; pass --field with one of: email_body, "
                                            "subject_line"):
            read_documents("tfds:aeslc:train")  # two Text features and no default for aeslc
        with pytest.raises(DataError, match=r"tfds:no_such_dataset: Dataset no_such_dataset not found"):
            read_documents("tfds:no_such_dataset")
    with pytest.raises(DataError, match=r"expected tfds:NAME\[:SPLIT\]"):
        read_documents("tfds:")


class LongropeTinyBooks(tfds.core.GeneratorBasedBuilder):
    """Prepared for real in a temporary TFDS data dir: the path without mocks (ArrayRecord, no TF)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text(), "n": np.int32, "title": np.str_}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

    def _generate_examples(self, k):
        for i in range(k):
            yield i, {"body": f"Büch {i}. " * (10 * (i + 1)), "n": i, "title": f"t{i}"}


def test_prepared_array_record_dataset(tmp_path, monkeypatch):
    pytest.importorskip("importlib_resources")  # download_and_prepare imports it (extra tfds installs it)
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    logs = []
    docs = read_documents("tfds:longrope_tiny_books", log=logs.append)
    assert (tmp_path / "longrope_tiny_books" / "1.0.0" / "dataset_info.json").exists()
    assert any("not prepared" in m for m in logs)
    assert any("no 'validation' split; reading 'test'" in m for m in logs)
    assert any("reading feature 'body'" in m for m in logs)
    assert sorted(d.text for d in docs) == [f"Büch {i}. " * (10 * (i + 1)) for i in range(2)]
    assert [d.name for d in docs] == ["tfds:longrope_tiny_books:test:0", "tfds:longrope_tiny_books:test:1"]
    logs.clear()
    train = read_documents("tfds:longrope_tiny_books:train", max_documents=2, log=logs.append)
    assert len(train) == 2 and all(d.text.startswith("Büch ") for d in train)
    assert not any("not prepared" in m for m in logs) and any("first 2 of 3" in m for m in logs)
    every = [d.text for d in read_documents("tfds:longrope_tiny_books:train")]
    assert [d.text for d in read_documents("tfds:longrope_tiny_books:train[1:]")] == every[1:]
    assert read_documents("tfds:longrope_tiny_books:train", field="title")[0].text.startswith("t")
    with pytest.raises(DataError, match=r"longrope_tiny_books has no split 'validation' \(splits: test, train\)"):
        read_documents("tfds:longrope_tiny_books:validation")


def test_parse_tfds():
    p = documents.parse_tfds
    assert p("tfds:pg19") == ("pg19", None)
    assert p("tfds:pg19:validation") == ("pg19", "validation")
    assert p("tfds:pg19:0.1.1:test") == ("pg19:0.1.1", "test")
    assert p("tfds:scientific_papers/arxiv:1.*.*") == ("scientific_papers/arxiv:1.*.*", None)
    assert p("tfds:pg19:validation[:10]") == ("pg19", "validation[:10]")


def test_missing_tfds_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match=r"tfds:pg19:validation: TensorFlow Datasets is not installed .*"
                                        r"pip install -c constraints.txt 'longrope-jax\[tfds\]'"):
        read_documents("tfds:pg19:validation")
