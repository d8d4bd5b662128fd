"""Training text: what is read, how it splits by document, its token ids (bytes or a local tokenizer), and bad input."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moeify.conversion.text import local_tokenizer, stdlib_files
from moeify.errors import MoeifyError
from moeify.training.corpus import Document, load_corpus, read_source, split_documents
from moeify.training.tokens import byte_tokens, model_tokens

BYTES = byte_tokens(384)


def test_a_directory_is_its_text_files_sorted_recursively(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("print(1)\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "b" / "latin1.txt").write_bytes(b"caf\xe9\n")  # not UTF-8: read with errors="replace"
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x01")  # a NUL byte: binary, skipped
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: main\n")  # hidden: skipped
    source = read_source(text=tmp_path)
    assert (source.name, source.unit) == (str(tmp_path), "file")
    assert source.documents == [Document("a.txt", "first\n"), Document("b/latin1.txt", "caf\ufffd\n"),
                                Document("b/z.py", "print(1)\n")]


def test_jsonl_documents_are_its_lines_and_bytes_are_ids_plus_3_with_eos_between(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ab"}\n\n{"text": "c", "id": 7}\n')
    source = read_source(data=data)
    assert source.unit == "line" and source.documents == [Document("d.jsonl:1", "ab"), Document("d.jsonl:3", "c")]
    corpus = load_corpus(BYTES, data=data)
    # Two documents: one is held out (seed 0 holds out line 1). 'a' = 97 -> 100, 'b' -> 101, 'c' -> 102;
    # EOS (1) ends each document.
    assert (corpus.train.ids.tolist(), corpus.validation.ids.tolist()) == ([102, 1], [100, 101, 1])
    assert corpus.describe() == [f"text: {data} (utf-8 bytes tokens)", "train: 1 line, 1 bytes, 2 tokens",
                                 "validation: 1 line, 2 bytes, 3 tokens"]


def test_the_split_is_by_document_seeded_and_stable():
    docs = [Document(f"{i:02}.py", f"x = {i}\n") for i in range(40)]
    train, validation = split_documents(docs, 0.05, seed=0)
    assert len(validation) == 2 and len(train) == 38  # round(40 * 0.05)
    assert sorted(train + validation, key=lambda d: d.name) == docs and train == sorted(train, key=lambda d: d.name)
    assert split_documents(docs, 0.05, seed=0) == (train, validation)
    assert split_documents(docs, 0.05, seed=1)[1] != validation
    # Names are ranked, not positions: the order documents are listed in changes nothing.
    assert split_documents(docs[::-1], 0.05, seed=0) == (train[::-1], validation[::-1])
    assert len(split_documents(docs[:3], 0.05)[1]) == 1 and len(split_documents(docs[:2], 0.9)[1]) == 1


def test_one_document_is_cut_at_a_line_start():
    # fraction 0.5 of "one\ntwo\nthree\n" (14 characters): index 7 is two's newline, so the cut is after it.
    train, validation = split_documents([Document("f.txt", "one\ntwo\nthree\n")], 0.5)
    assert train == [Document("f.txt", "one\ntwo\n")] and validation == [Document("f.txt", "three\n")]
    with pytest.raises(MoeifyError, match=r"^f.txt is too short to split into train and validation \(1 characters\): give more text$"):
        split_documents([Document("f.txt", "x")], 0.05)


def test_the_default_is_the_standard_librarys_files_split_by_file():
    corpus = load_corpus(BYTES)
    files = stdlib_files()
    held = min(max(round(len(files) * 0.05), 1), len(files) - 1)
    assert (corpus.train.documents, corpus.validation.documents) == (len(files) - held, held)
    assert corpus.describe()[0].startswith("text: Python 3.") and corpus.unit == "file"
    # Byte tokens: one id per UTF-8 byte, plus an EOS after each file.
    for split in (corpus.train, corpus.validation):
        assert split.tokens == split.bytes + split.documents
    total = sum(len(f.read_text(encoding="utf-8", errors="replace").encode()) for f in files)
    assert corpus.train.bytes + corpus.validation.bytes == total


@pytest.mark.parametrize("kind,content,message", [
    ("data", '{"text": "ok"}\n{"txt": "no"}\n', r'line 2 has no string "text" field: each line must be an object '
                                                r'like \{"text": "..."\}$'),
    ("data", '{"text": 3}\n', r'line 1 has no string "text" field'),
    ("data", '["text"]\n', r'line 1 has no string "text" field'),
    ("data", '{"text": "a"}\nnot json\n', r"line 2 is not JSON \(Expecting value\): each line must be an object"),
    ("data", '{"text": ""}\n', r"in.jsonl holds no text: point text at a non-empty UTF-8 file or directory, or "
                               r"data at a JSONL file with text$"),
    ("text", "", r"holds no text"),
])
def test_bad_text_is_one_line_naming_the_fix(tmp_path, kind, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(MoeifyError, match=message) as e:
        load_corpus(BYTES, **{kind: path})
    assert "\n" not in str(e.value)


def test_missing_or_misplaced_paths_are_refused(tmp_path):
    with pytest.raises(MoeifyError, match=r"^text='.*nope' does not exist: give a UTF-8 text file or a directory"):
        read_source(text=tmp_path / "nope")
    with pytest.raises(MoeifyError, match=r"^data='.*nope.jsonl' does not exist: give a JSONL file with one "):
        read_source(data=tmp_path / "nope.jsonl")
    with pytest.raises(MoeifyError, match=r"is a directory: give one JSONL file, or the directory as text$"):
        read_source(data=tmp_path)
    with pytest.raises(MoeifyError, match=r"^give text or data, not both$"):
        read_source(text=tmp_path, data=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MoeifyError, match=r"holds no text"):
        load_corpus(BYTES, text=tmp_path)


def test_byte_tokens_put_sentinels_and_mask_above_the_bytes():
    assert (BYTES.eos_id, BYTES.mask_id, BYTES.random_ids) == (1, 383, (3, 259))
    assert BYTES.sentinel_ids == tuple(range(383, 258, -1)) and len(BYTES.sentinel_ids) == 125
    assert BYTES.encode("a\u00e9").tolist() == [97 + 3, 0xC3 + 3, 0xA9 + 3]  # é is two UTF-8 bytes
    with pytest.raises(MoeifyError, match=r"^the model has 259 token ids, but byte tokens need 259 \(3 specials \+ "
                                          r"256 bytes\) and one more above them"):
        byte_tokens(259)


def _save_tokenizer(path, extra_ids):
    words = ["<pad>", "</s>", "<unk>", "hello", "world"] + [f"<extra_id_{i}>" for i in range(extra_ids)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return local_tokenizer([path])  # what the loop finds in a model directory: local files only


def test_a_local_tokenizer_gives_the_ids_and_its_own_sentinels(tmp_path):
    tokenizer = _save_tokenizer(tmp_path / "with", extra_ids=2)
    tokens = model_tokens(64, tokenizer)
    assert (tokens.eos_id, tokens.mask_id, tokens.sentinel_ids, tokens.random_ids) == (1, None, (5, 6), (0, 7))
    # One file, cut after the newline that follows 60% of its 18 characters.
    (tmp_path / "doc.txt").write_text("hello world\nhello\n")
    corpus = load_corpus(tokens, text=tmp_path / "doc.txt", validation_fraction=0.4)
    assert (corpus.train.ids.tolist(), corpus.validation.ids.tolist()) == ([3, 4, 1], [3, 1])
    # Without <extra_id_*> tokens the sentinels are the model's highest ids, as in T5.
    plain = model_tokens(64, _save_tokenizer(tmp_path / "without", extra_ids=0))
    assert plain.sentinel_ids == tuple(range(63, -1, -1))
    with pytest.raises(MoeifyError, match=r"^the tokenizer has 7 ids but the model only 6 embeddings: keep the "
                                          r"tokenizer that was saved with this model in its directory$"):
        model_tokens(6, tokenizer)


def test_jsonl_text_may_hold_line_separators(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ["a\u2028b", "c"]) + "\n")
    assert [d.text for d in read_source(data=data).documents] == ["a\u2028b", "c"]
