"""The activation store: manifest + Parquet tables + Zarr v3 arrays in append-only, atomic shards."""

from headlab.store.examples import ExampleInfo
from headlab.store.fingerprint import fingerprint
from headlab.store.store import SCHEMA_VERSION, Store, VerifyReport

__all__ = ["SCHEMA_VERSION", "ExampleInfo", "Store", "VerifyReport", "fingerprint"]
