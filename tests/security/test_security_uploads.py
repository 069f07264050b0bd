"""Upload validation is linear and bounded: wide or long lines answer a quick 422 over real HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.errors import Unprocessable
from app.services.datasets import UploadLimits, check_file
from tests.security.conftest import Server, TenantFactory, upload


def _wide_jsonl(columns: int) -> bytes:
    record = {"text": "hello", "label": 1} | {f"c{i}": i for i in range(columns - 2)}
    return (json.dumps(record) + "\n").encode()


def test_a_line_of_40000_keys_is_refused_quickly_and_normal_uploads_work(
    shared_root_server: Server, two_tenants: TenantFactory
) -> None:
    alice, _ = two_tenants(shared_root_server)
    body = _wide_jsonl(40_000)  # ~530 kB, under MAX_UPLOAD_BYTES: 13 s of API CPU before the fix
    started = time.monotonic()
    response = alice.client.post("/distillation/datasets", files={"file": ("wide.jsonl", body)})
    elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    assert "MAX_UPLOAD_COLUMNS" in response.json()["detail"] and response.json()["max_upload_columns"] == 1000
    assert elapsed < 5.0, f"the refusal took {elapsed:.1f} s"

    header = ",".join(["text", "label", *(f"c{i}" for i in range(5000))]).encode() + b"\n"
    wide_csv = alice.client.post("/distillation/datasets", files={"file": ("wide.csv", header + b"x,1\n")})
    assert wide_csv.status_code == 422 and "MAX_UPLOAD_COLUMNS" in wide_csv.json()["detail"]

    long_line = b'{"text": "' + b"a" * (1024 * 1024 + 10) + b'", "label": 1}\n'
    too_long = alice.client.post("/distillation/datasets", files={"file": ("long.jsonl", long_line)})
    assert too_long.status_code == 422 and "line 1" in too_long.json()["detail"]
    assert "MAX_UPLOAD_LINE_BYTES" in too_long.json()["detail"]

    ok = upload(alice.client, _wide_jsonl(50) * 3, "fine.jsonl")
    assert ok["num_rows"] == 3 and len(ok["columns"]) == 50
    csv_ok = upload(alice.client, b'text,label\n"multi\nline",1\nplain,0\n', "fine.csv")
    assert csv_ok["num_rows"] == 2 and csv_ok["num_labels"] == 2


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_validation_time_grows_linearly_with_columns(tmp_path: Path, fmt: str) -> None:
    """100k columns (limit raised) validate in well under a second per 10k; the old check was quadratic."""
    limits = UploadLimits(max_columns=200_000, max_line_bytes=64 * 1024 * 1024)
    timings = {}
    for columns in (10_000, 100_000):
        path = tmp_path / f"wide-{columns}.{fmt}"
        if fmt == "jsonl":
            path.write_bytes(_wide_jsonl(columns) * 2)
        else:
            names = ["text", "label", *(f"c{i}" for i in range(columns - 2))]
            values = ["hi", "1", *("0" for _ in range(columns - 2))]
            path.write_text(",".join(names) + "\n" + ",".join(values) + "\n")
        started = time.perf_counter()
        summary = check_file(path, fmt, limits)
        timings[columns] = time.perf_counter() - started
        assert len(summary.columns) == columns
    assert timings[100_000] < 5.0, timings  # quadratic: minutes
    with pytest.raises(Unprocessable, match="MAX_UPLOAD_COLUMNS"):
        check_file(tmp_path / f"wide-100000.{fmt}", fmt, UploadLimits(max_columns=1000, max_line_bytes=10**8))
