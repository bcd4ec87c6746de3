"""Documents and evaluation windows (the perplexity protocol)."""

import json

import numpy as np
import pytest

from longrope_jax.data import DataError, read_documents, read_sources, source_list, windows, windows_from


class CharTok:
    """One token per character: lengths are easy to reason about."""

    def encode(self, text):
        return [ord(c) % 256 for c in text]


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("y" * 20)
    docs = read_documents(str(tmp_path))
    assert [d.text for d in docs] == ["x" * 10, "y" * 20]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["aa", "bbb"]) + "\n")
    docs = read_documents(str(jl))
    assert [d.name for d in docs] == [f"{jl}:1", f"{jl}:2"] and docs[1].text == "bbb"
    pydoc = read_documents("pydoc:")
    assert len(pydoc) == 1 and len(pydoc[0].text) > 400_000


def test_windows_take_first_tokens_skip_short_and_seeded_choice(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(chr(65 + i) * (5 if i == 0 else 30))
    docs = read_documents(str(tmp_path))
    w = windows(docs, CharTok(), 16, 3, seed=1)
    assert w.tokens.shape == (3, 16) and w.tokens.dtype == np.int32
    assert w.skipped_short == 1 and w.available == 5
    assert w.documents == sorted(w.documents)
    assert windows(docs, CharTok(), 16, 3, seed=1).documents == w.documents
    assert {tuple(windows(docs, CharTok(), 16, 3, seed=s).documents) for s in range(8)} != {tuple(w.documents)}
    for row, name in zip(w.tokens, w.documents):
        assert len(set(row.tolist())) == 1


def test_document_shorter_than_length_is_a_clear_error(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("z" * 100)
    with pytest.raises(DataError, match=r"short.txt: expected 1 document\(s\) of at least 128 tokens, found 0 "
                                        r"\(1 shorter; the longest has 100 tokens\)"):
        windows(read_documents(str(f)), CharTok(), 128, 1, source=str(f))


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_documents(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        read_documents(str(bad))
    with pytest.raises(DataError, match="--length: expected at least 2"):
        windows([], CharTok(), 1, 1)


def test_windows_from_several_sources_split_the_samples_seeded(tmp_path):
    for src, n in (("a", 4), ("b", 3)):
        (tmp_path / src).mkdir()
        for i in range(n):
            (tmp_path / src / f"{i}.txt").write_text(chr(65 + i) * 30)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    one = windows_from(read_sources(a), CharTok(), 16, 2, seed=3)  # one source: exactly windows()
    ref = windows(read_documents(a), CharTok(), 16, 2, seed=3, source=a)
    assert one.documents == ref.documents and np.array_equal(one.tokens, ref.tokens)
    w = windows_from(read_sources([a, b]), CharTok(), 16, 3, seed=3)
    assert w.tokens.shape == (3, 16) and w.available == 7
    assert [d.split("/")[-2] for d in w.documents] == ["a", "a", "b"]  # 2 + 1, source by source
    assert w.documents[:2] == windows(read_documents(a), CharTok(), 16, 2, seed=[3, 0]).documents
    assert w.documents[2:] == windows(read_documents(b), CharTok(), 16, 1, seed=[3, 1]).documents
    assert windows_from(read_sources([a, b]), CharTok(), 16, 3, seed=3).documents == w.documents
    assert {tuple(windows_from(read_sources([a, b]), CharTok(), 16, 3, seed=s).documents) for s in range(6)} != {
        tuple(w.documents)}
    with pytest.raises(DataError, match=r"--samples: expected at least one window per --data source \(2\), got 1"):
        windows_from(read_sources([a, b]), CharTok(), 16, 1)
    with pytest.raises(DataError, match="--data: expected a source"):
        source_list([])


def _write_array_record(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def test_array_record_records_are_documents(tmp_path):
    texts = ["plain text, one document", json.dumps({"text": "from a JSON record", "id": 3}), "{not json",
             "ünïcode\n" * 3]
    f = tmp_path / "shard.array_record-00000-of-00002"
    _write_array_record(f, [t.encode() for t in texts])
    docs = read_documents(str(f))
    assert [d.text for d in docs] == [texts[0], "from a JSON record", "{not json", texts[3]]
    assert [d.name for d in docs] == [f"{f}:{i}" for i in range(4)]
    (tmp_path / "x.txt").write_text("text file")  # a directory mixes ArrayRecord shards and text files
    assert [d.text for d in read_documents(str(tmp_path))][:4] == [d.text for d in docs]
    assert read_documents(str(tmp_path), max_documents=2) == docs[:2]
    g = tmp_path / "field.array_record"
    _write_array_record(g, [json.dumps({"body": "b"}).encode()])
    assert read_documents(str(g), "body")[0].text == "b"


def test_bad_array_record_files_are_one_line_errors(tmp_path):
    g = tmp_path / "nofield.array_record"
    _write_array_record(g, [b"ok", json.dumps({"body": "b"}).encode()])
    with pytest.raises(DataError, match=r"nofield.array_record: record 1: expected a JSON object with a string "
                                        r"field 'text'"):
        read_documents(str(g))
    b = tmp_path / "binary.array_record"
    _write_array_record(b, [b"\xff\xfe"])
    with pytest.raises(DataError, match=r"binary.array_record: record 0: expected UTF-8 text or a JSON object"):
        read_documents(str(b))
    junk = tmp_path / "junk.array_record"
    junk.write_bytes(b"this is not an array record file")
    with pytest.raises(DataError, match=r"junk.array_record: not a readable ArrayRecord file"):
        read_documents(str(junk))
