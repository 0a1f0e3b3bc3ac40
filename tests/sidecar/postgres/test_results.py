"""Row masking: by column name (mask.fields paths) and by detector; types clients can decode."""

from __future__ import annotations

from chaperone_sidecar.policy.model import MaskSpec
from chaperone_sidecar.postgres.protocol import Column
from chaperone_sidecar.postgres.results import RowMasker, sample_row

KEY = "AKIAIOSFODNN7EXAMPLE"


def col(name, oid=25, fmt=0):
    return Column(name, 0, 0, oid, -1, -1, fmt)


def test_columns_named_by_a_field_path_are_masked_keeping_a_decodable_value():
    masker = RowMasker([MaskSpec(fields=("$.password", "$.pin", "$.meta", "$.doc"))])
    cols = [col("id", 23), col("password"), col("pin", 23), col("meta", 3802), col("doc", 114)]
    row, changed = masker.row(cols, [b"1", b"hunter2", b"1234", b'{"a":1}', b'{"b":2}'])
    assert changed
    assert row == [b"1", b"[MASKED:field]", None, b'"[MASKED:field]"', b'"[MASKED:field]"']


def test_binary_jsonb_keeps_its_version_byte():
    masker = RowMasker([MaskSpec(fields=("$.meta",))])
    row, _ = masker.row([col("meta", 3802, 1)], [b'\x01{"a":1}'])
    assert row == [b'\x01"[MASKED:field]"']


def test_every_column_and_duplicate_names():
    masker = RowMasker([MaskSpec(fields=("$.*",))])
    row, _ = masker.row([col("a"), col("a")], [b"x", b"y"])
    assert row == [b"[MASKED:field]", b"[MASKED:field]"]


def test_detectors_mask_inside_any_text_column_but_not_binary_non_text():
    masker = RowMasker([MaskSpec(detectors=("aws-access-key-id",))])
    row, changed = masker.row([col("note"), col("blob", 17, 1)], [f"key {KEY}".encode(), KEY.encode()])
    assert changed and row[0] == b"key [MASKED:aws-access-key-id]" and row[1] == KEY.encode()
    row, changed = masker.row([col("note")], [b"nothing here"])
    assert not changed and row == [b"nothing here"]


def test_request_only_masks_do_not_touch_rows_and_nulls_stay_null():
    assert not RowMasker([MaskSpec(fields=("$.password",), target="request")]).active
    masker = RowMasker([MaskSpec(fields=("$.password",))])
    assert masker.row([col("password")], [None]) == ([None], False)


def test_a_row_without_its_description_still_gets_the_detectors():
    masker = RowMasker([MaskSpec(fields=("$.password",), detectors=("aws-access-key-id",))])
    row, changed = masker.row(None, [KEY.encode()])
    assert changed and row == [b"[MASKED:aws-access-key-id]"]


def test_recorded_sample_rows_are_bounded():
    sample = sample_row([col("a"), col("b", 17, 1)], [b"x" * 1000, b"\x00\x01"])
    assert sample["a"].startswith("x" * 256) and sample["a"].endswith("<1000 bytes>")
    assert sample["b"] == "<2 binary bytes>"


def test_a_masked_column_read_under_another_label_masks_every_column():
    spec = [MaskSpec(fields=("$.password",))]
    masker = RowMasker(spec, output_refs=("password",))
    assert masker.row([col("id", 23), col("pw")], [b"1", b"hunter2"]) == ([None, b"[MASKED:field]"], True)
    assert RowMasker(spec, output_refs=("(row)",)).every_column
    assert not RowMasker(spec, output_refs=("name",)).every_column
    assert not RowMasker([MaskSpec(detectors=("jwt",))], output_refs=("(row)",)).every_column


def test_a_batch_of_rows_masks_the_one_row_with_a_secret():
    masker = RowMasker([MaskSpec(detectors=("aws-access-key-id",))])
    rows = [[str(i).encode(), b"clean"] for i in range(300)]
    rows[257][1] = f"key {KEY}".encode()
    out, changed = masker.rows([col("id", 23), col("note")], rows)
    assert changed == [i == 257 for i in range(300)]
    assert out[257][1] == b"key [MASKED:aws-access-key-id]" and out[0] == [b"0", b"clean"]
