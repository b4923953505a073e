"""The names and thresholds the Python package copies from the Rust crates, pinned to the Rust
source they copy: a rename on one side fails here instead of in a user's notebook."""

import re
from pathlib import Path

import pyarrow as pa
import pytest

from cpa_stream import _openmp, _run, _store

ROOT = Path(__file__).resolve().parents[2]


def rust_const(path: str, name: str) -> str:
    """The literal text of ``pub const NAME: TYPE = VALUE;`` in a Rust file of the repository."""
    text = (ROOT / path).read_text()
    found = re.search(rf"pub const {name}\s*:[^=]*=\s*(.*?);", text, re.S)
    if found is None:
        pytest.fail(f"{path}: no `pub const {name}`")
    return found.group(1).strip()


def rust_strings(path: str, name: str) -> list[str]:
    """The string literals of a Rust constant (one, or an array's)."""
    return re.findall(r'"([^"]*)"', rust_const(path, name))


TABLES = "schemas/src/tables.rs"


@pytest.mark.parametrize("python, rust", [
    (_run.EXPECTED_LOG1P, "EXPECTED_LOG1P"),
    (_run.CHANGE_LOG1P, "CHANGE_LOG1P"),
    (_run.ANCHORED, "ANCHORED"),
    (_run.IS_ANCHORED, "IS_ANCHORED"),
    (_run.GENES_KEY.decode(), "GENES_KEY"),
])
def test_prediction_columns_and_keys_are_the_schemas(python, rust):
    assert [python] == rust_strings(TABLES, rust)


def test_latents_are_the_schemas_in_order():
    assert list(_run.LATENTS) == rust_strings(TABLES, "LATENTS")


def test_the_busy_cpu_threshold_and_its_variable_are_the_pipelines():
    assert _openmp.BUSY == float(rust_const("pipeline/src/threads.rs", "BUSY"))
    assert [_openmp.BUSY_VAR] == rust_strings("pipeline/src/threads.rs", "BUSY_CPUS_VAR")


@pytest.mark.parametrize("python, rust", [
    (_store.CATEGORIES_KEY.decode(), "CATEGORIES_KEY"),
    (_store.ORDERED_KEY.decode(), "ORDERED_KEY"),
    (_store.SOURCE_NAME_KEY.decode(), "SOURCE_NAME_KEY"),
])
def test_store_schema_keys_are_the_schemas(python, rust):
    assert [python] == rust_strings(TABLES, rust)


def test_a_deg_table_from_python_has_the_rust_schemas_columns_and_types():
    """The DEG table the package writes from ``uns`` (an in-memory import) is the one
    ``schemas::tables::deg_schema`` declares: names, order and nullability."""
    _, table = _store._degs_from_uns({"degs": {"A": ["g1", "g2"]}}, "degs")
    declared = re.search(r"pub fn deg_schema\(\).*?\n\}", (ROOT / TABLES).read_text(), re.S).group(0)
    fields = re.findall(r"Field::new\(degs::(\w+), DataType::(\w+), (true|false)\)", declared)
    names = [rust_strings(TABLES, name)[0] for name, _, _ in fields]
    assert table.schema.names == names
    assert [f.nullable for f in table.schema] == [n == "true" for _, _, n in fields]
    types = {"Utf8": pa.string(), "UInt32": pa.uint32(), "Float64": pa.float64()}
    assert [f.type for f in table.schema] == [types[t] for _, t, _ in fields]


def test_is_zarr_looks_for_the_files_the_rust_reader_does(tmp_path):
    source = (ROOT / "stages/src/input.rs").read_text()
    markers = re.findall(r'path\.join\("([^"]+)"\)\.is_file\(\)', source)
    assert sorted(markers) == [".zgroup", "zarr.json"], markers
    for marker in markers:
        store = tmp_path / marker.strip(".").replace(".", "-")
        store.mkdir()
        assert not _store.is_zarr(store)
        (store / marker).write_text("{}")
        assert _store.is_zarr(store), marker
