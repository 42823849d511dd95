"""The storage contracts (runtime/storage/base.py) declare what the kernel uses: every backend implements
its contract in full, and every store or document method the kernel calls is declared there."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

from macp_runtime import kernel
from macp_runtime.kernel import receipt_keys
from macp_runtime.registries import spec_archive
from macp_runtime.storage import FileLogStore, MemoryStore
from macp_runtime.storage.base import DocumentStore, SharedStore, Store
from macp_runtime.storage.documents import FileDocuments, MemoryDocuments


def _called_on(module, owner: str) -> set[str]:
    """Names of the attributes used as `self.<owner>.<name>` in a module's source."""
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == owner and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_every_store_method_the_kernel_calls_is_declared():
    used = set()
    for info in pkgutil.iter_modules(kernel.__path__):
        if info.name == "metrics":   # reads the file log's fsync counters where the store has them (counts_syncs)
            continue
        used |= _called_on(importlib.import_module(f"{kernel.__name__}.{info.name}"), "store")
    assert used, "the kernel no longer calls self.store.<method>: update this test"
    undeclared = sorted(name for name in used if not hasattr(SharedStore, name))
    assert undeclared == [], f"declare these in storage/base.py: {undeclared}"


def test_every_document_method_the_registries_call_is_declared():
    used = _called_on(receipt_keys, "documents") | _called_on(spec_archive, "documents")
    assert used
    assert sorted(name for name in used if not hasattr(DocumentStore, name)) == []


@pytest.mark.parametrize("cls", [MemoryStore, FileLogStore])
def test_local_stores_implement_the_store_contract(cls):
    assert issubclass(cls, Store) and not inspect.isabstract(cls)
    assert cls.shared is False
    assert cls.defers == (cls.append_deferred is not Store.append_deferred)


def test_the_postgres_store_implements_the_shared_contract():
    pytest.importorskip("psycopg")
    from macp_runtime.storage.postgres import PostgresDocuments, PostgresStore

    assert issubclass(PostgresStore, SharedStore) and not inspect.isabstract(PostgresStore)
    assert PostgresStore.shared and PostgresStore.durable and not PostgresStore.defers
    assert issubclass(PostgresDocuments, DocumentStore) and not inspect.isabstract(PostgresDocuments)
    assert PostgresDocuments.locked is not DocumentStore.locked   # exclusive across instances


@pytest.mark.parametrize("cls", [MemoryDocuments, FileDocuments])
def test_local_documents_implement_the_document_contract(cls):
    assert issubclass(cls, DocumentStore) and not inspect.isabstract(cls)
    assert cls.shared is False
