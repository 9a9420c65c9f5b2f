"""Table contracts: load the JSON files in ``schemas/`` and hold every table to them.

The contract files are the single source of truth for column names, Arrow types, nullability and the file
metadata each table carries. Code never re-declares columns: it asks a ``Contract`` for its Arrow schema,
casts what it writes with ``conform`` and checks what it reads with ``validate``.

Type grammar of a contract file (language-neutral JSON):
``"string" | "bool" | "int32" | "int64" | "float16" | "float32" | "float64"``,
``{"list": T}``, ``{"fixed_size_list": T, "size": N or "$param"}``, ``{"struct": [column, ...]}``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

import pyarrow as pa

from rolo_batch.errors import ConfigError, InputError

SCHEMA_META_KEY = b"rolo_batch.schema"

_PRIMITIVES = {
    "string": pa.string(), "bool": pa.bool_(), "int32": pa.int32(), "int64": pa.int64(),
    "float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64(),
}


@dataclass(frozen=True)
class Column:
    """One column of a contract: its name, JSON type spec, nullability and description."""

    name: str
    type_spec: Any
    nullable: bool
    description: str

    @property
    def type_text(self) -> str:
        """A short human-readable type, e.g. ``fixed_size_list<float16>[feature_dim]``."""
        return _type_text(self.type_spec)


@dataclass(frozen=True)
class Contract:
    """A versioned table contract loaded from ``schemas/<table>.json``."""

    table: str
    version: int
    description: str
    columns: tuple[Column, ...]
    parameters: Mapping[str, str]
    metadata: Mapping[str, str]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def tag(self) -> str:
        """``<table>/<version>``, stored in every written file's metadata."""
        return f"{self.table}/{self.version}"

    def arrow_schema(self, metadata: Mapping[str, str] | None = None, **params: int) -> pa.Schema:
        """The Arrow schema, with ``$param`` sizes filled from ``params`` and the contract tag in metadata."""
        missing = [p for p in self.parameters if p not in params]
        if missing:
            raise ConfigError(f"contract {self.tag} needs parameter(s) {', '.join(missing)}")
        fields = [pa.field(c.name, _arrow_type(c.type_spec, params), nullable=c.nullable) for c in self.columns]
        meta = {SCHEMA_META_KEY: self.tag.encode()}
        for key, value in (metadata or {}).items():
            meta[key.encode()] = str(value).encode()
        return pa.schema(fields, metadata=meta)

    def infer_parameters(self, schema: pa.Schema) -> dict[str, int]:
        """Read the ``$param`` sizes off an existing schema (e.g. ``feature_dim`` from the feature column)."""
        found: dict[str, int] = {}
        for column in self.columns:
            if column.name in schema.names:
                _collect_params(column.type_spec, schema.field(column.name).type, found)
        return found

    def validate(self, data: pa.Table | pa.Schema, *, source: str = "table", **params: int) -> dict[str, int]:
        """Check names, order-independent presence, types and nullability against the contract.

        Returns the parameters (given or inferred). Raises ``InputError`` naming ``source`` and the column at
        fault, with the expected and the found type.
        """
        schema = data if isinstance(data, pa.Schema) else data.schema
        tag = (schema.metadata or {}).get(SCHEMA_META_KEY, b"").decode()
        if tag and tag.split("/")[0] == self.table and tag != self.tag:
            raise InputError(f"written under contract {tag}, but this version of rolo-batch reads {self.tag}; "
                             f"re-create the table or use a matching rolo-batch", path=source)
        inferred = self.infer_parameters(schema)
        for key, value in params.items():
            if key in inferred and inferred[key] != value:
                raise InputError(f"{self.tag}: {key} is {inferred[key]}, expected {value}", path=source)
        resolved = {**inferred, **params}
        expected = self.arrow_schema(**{p: resolved.get(p, 0) for p in self.parameters})
        for field in expected:
            if field.name not in schema.names:
                raise InputError(f"{self.tag}: column {field.name!r} is missing (found columns: "
                                 f"{', '.join(schema.names)})", path=source)
            found = schema.field(field.name)
            if not found.type.equals(field.type):
                raise InputError(f"{self.tag}: column {field.name!r} has type {found.type}, "
                                 f"expected {field.type}", path=source)
        extra = [n for n in schema.names if n not in expected.names]
        if extra:
            raise InputError(f"{self.tag}: unexpected column(s) {', '.join(map(repr, extra))}", path=source)
        if isinstance(data, pa.Table):
            for field in expected:
                if not field.nullable and data.column(field.name).null_count:
                    raise InputError(f"{self.tag}: column {field.name!r} has "
                                     f"{data.column(field.name).null_count} null value(s) but is not nullable",
                                     path=source)
        return resolved

    def conform(self, data: pa.Table, metadata: Mapping[str, str] | None = None, **params: int) -> pa.Table:
        """``data`` with the contract's column order, types and metadata (casting where safe), then validated."""
        inferred = self.infer_parameters(data.schema)
        for key, value in params.items():
            if key in inferred and inferred[key] != value:
                raise InputError(f"{self.tag}: rows have {key} {inferred[key]}, expected {value}")
        resolved = {**inferred, **params}
        schema = self.arrow_schema(metadata, **resolved)
        missing = [n for n in schema.names if n not in data.column_names]
        if missing:
            raise InputError(f"{self.tag}: column(s) {', '.join(map(repr, missing))} missing from the rows written")
        columns = []
        for field in schema:
            column = data.column(field.name)
            if not column.type.equals(field.type):
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                    raise InputError(f"{self.tag}: column {field.name!r} of type {column.type} cannot become "
                                     f"{field.type}: {exc}") from None
            columns.append(column)
        table = pa.Table.from_arrays(columns, schema=schema)
        self.validate(table, source=f"rows for {self.tag}", **resolved)
        return table


def _arrow_type(spec: Any, params: Mapping[str, int]) -> pa.DataType:
    if isinstance(spec, str):
        if spec not in _PRIMITIVES:
            raise ConfigError(f"unknown type {spec!r} in a contract")
        return _PRIMITIVES[spec]
    if "list" in spec:
        return pa.list_(_arrow_type(spec["list"], params))
    if "fixed_size_list" in spec:
        size = spec["size"]
        if isinstance(size, str):
            size = int(params[size.lstrip("$")])
        return pa.list_(_arrow_type(spec["fixed_size_list"], params), size)
    if "struct" in spec:
        return pa.struct([pa.field(f["name"], _arrow_type(f["type"], params), nullable=f.get("nullable", True))
                          for f in spec["struct"]])
    raise ConfigError(f"unknown type {spec!r} in a contract")


def _type_text(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if "list" in spec:
        return f"list<{_type_text(spec['list'])}>"
    if "fixed_size_list" in spec:
        return f"fixed_size_list<{_type_text(spec['fixed_size_list'])}>[{str(spec['size']).lstrip('$')}]"
    return "struct<" + ", ".join(f"{f['name']}: {_type_text(f['type'])}" for f in spec["struct"]) + ">"


def _collect_params(spec: Any, found_type: pa.DataType, out: dict[str, int]) -> None:
    if isinstance(spec, dict) and "fixed_size_list" in spec and pa.types.is_fixed_size_list(found_type):
        if isinstance(spec["size"], str):
            out[spec["size"].lstrip("$")] = found_type.list_size
        _collect_params(spec["fixed_size_list"], found_type.value_type, out)
    elif isinstance(spec, dict) and "list" in spec and pa.types.is_list(found_type):
        _collect_params(spec["list"], found_type.value_type, out)


@functools.lru_cache(maxsize=None)
def load(table: str) -> Contract:
    """The contract of ``table`` (``features``, ``tracks``, ``scores``), from the packaged ``schemas/``."""
    try:
        text = resources.files("rolo_batch.schemas").joinpath(f"{table}.json").read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no contract named {table!r}; known: {', '.join(available())}") from None
    raw = json.loads(text)
    columns = tuple(Column(c["name"], c["type"], bool(c.get("nullable", True)), c.get("description", ""))
                    for c in raw["columns"])
    return Contract(table=raw["table"], version=int(raw["version"]), description=raw.get("description", ""),
                    columns=columns, parameters=raw.get("parameters", {}), metadata=raw.get("metadata", {}))


def available() -> list[str]:
    """Names of the packaged contracts."""
    return sorted(p.name[:-5] for p in resources.files("rolo_batch.schemas").iterdir() if p.name.endswith(".json"))


def contract_of(schema: pa.Schema) -> Contract | None:
    """The contract a written file says it follows (from its metadata), if any."""
    tag = (schema.metadata or {}).get(SCHEMA_META_KEY)
    if not tag:
        return None
    return load(tag.decode().split("/", 1)[0])
