"""iter_records: the one JSONL/Parquet record parser behind preprocess, clean_data and train_tokenizer."""

from megalite.data.readers import Chunk, iter_records


def test_jsonl_records_keep_line_numbers_and_report_bad_json():
    lines = b'{"text": "a"}\n\n   \n{not json\n[1, 2]\n\xff\n{"text": "b"}'
    got = list(iter_records(Chunk("f.jsonl", 10, 1.0, lines=lines)))
    assert [(n, obj) for n, obj, _ in got] == [(10, {"text": "a"}), (13, None), (14, [1, 2]), (15, None),
                                              (16, {"text": "b"})]
    assert [why for _, _, why in got] == [None, "invalid JSON (Expecting property name enclosed in double quotes)",
                                          None, "invalid JSON ('utf-8' codec can't decode byte 0xff in position 0)",
                                          None]


def test_parquet_rows_come_as_mappings():
    chunk = Chunk("f.parquet", 5, 1.0, records={"text": ["a", None], "id": [1, 2]})
    assert list(iter_records(chunk)) == [(5, {"text": "a", "id": 1}, None), (6, {"text": None, "id": 2}, None)]
    assert list(iter_records(Chunk("e.jsonl", 1, 1.0, lines=b""))) == []
