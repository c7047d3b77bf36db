"""The committed Python stubs under proto/openemploi/v1 must match their .proto files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from openemploi.testing.scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "proto"
STUB_DIR = PROTO_DIR / "openemploi" / "v1"
STUB_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


generate_mod = load_script(PROTO_DIR / "generate.py", "openemploi_proto_generate")


def committed_stubs() -> list[Path]:
    return sorted(p for suffix in STUB_SUFFIXES for p in STUB_DIR.glob(f"*{suffix}"))


def stale_stubs(generated_root: Path) -> list[str]:
    """Committed stubs that differ from (or are missing in) a fresh generation."""
    problems = []
    for committed in committed_stubs():
        fresh = generated_root / committed.relative_to(PROTO_DIR)
        if not fresh.is_file():
            problems.append(f"{committed.relative_to(REPO_ROOT)} (no longer generated)")
        elif fresh.read_bytes() != committed.read_bytes():
            problems.append(f"{committed.relative_to(REPO_ROOT)} (differs)")
    return problems


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    generate_mod.generate(out)
    return out


def test_there_are_protos_and_committed_stubs():
    protos = generate_mod.proto_files()
    assert [p.name for p in protos] and all(p.suffix == ".proto" for p in protos)
    assert (STUB_DIR / "embedding.proto") in protos
    assert committed_stubs()


def test_committed_stubs_are_byte_identical_to_regenerated(regenerated):
    problems = stale_stubs(regenerated)
    assert not problems, "stale protobuf stubs, run `make proto` and commit the result: " + ", ".join(problems)


def test_every_proto_has_its_committed_stubs(regenerated):
    missing = []
    for proto in generate_mod.proto_files():
        for suffix in STUB_SUFFIXES:
            stub = proto.with_name(proto.stem + suffix)
            if not stub.is_file():
                missing.append(str(stub.relative_to(REPO_ROOT)))
    assert not missing, "missing protobuf stubs, run `make proto` and commit the result: " + ", ".join(missing)
    # and nothing the generator writes is left uncommitted
    generated = sorted(p.relative_to(regenerated) for p in regenerated.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(PROTO_DIR) for p in committed_stubs())
    assert generated == committed, "run `make proto` and commit the result"


def test_staleness_check_catches_an_edited_proto(tmp_path, monkeypatch):
    """Guard against a vacuous check: editing the .proto must make the committed stubs stale."""
    edited_root = tmp_path / "proto"
    shutil.copytree(PROTO_DIR / "openemploi", edited_root / "openemploi")
    proto = edited_root / "openemploi" / "v1" / "embedding.proto"
    proto.write_text(proto.read_text(encoding="utf-8") + "\nmessage StalenessProbe { string note = 1; }\n", encoding="utf-8")
    monkeypatch.setattr(generate_mod, "PROTO_ROOT", edited_root)
    out = tmp_path / "out"
    out.mkdir()
    generate_mod.generate(out)
    problems = stale_stubs(out)
    assert any("embedding_pb2.py" in p for p in problems)


def test_committed_stubs_expose_the_service():
    from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert service.full_name == "openemploi.v1.EmbeddingService"
    assert {"Embed", "EmbedStream"} <= set(service.methods_by_name)
    assert hasattr(embedding_pb2_grpc, "EmbeddingServiceStub")


def test_document_vector_model_is_a_new_field_that_older_clients_leave_empty():
    """Field numbers 1-5 keep their meaning; bytes from a client built before field 6 read as 'the collection's model'."""
    from openemploi.v1 import index_pb2

    fields = {f.name: f.number for f in index_pb2.Document.DESCRIPTOR.fields}
    assert fields == {"id": 1, "text": 2, "vector": 3, "metadata": 4, "skills": 5, "vector_model": 6}
    older = b"\x0a\x01v" + b"\x1a\x04" + b"\x00\x00\x80\x3f"  # id = "v", vector = [1.0], as field 6 never existed
    document = index_pb2.Document.FromString(older)
    assert (document.id, list(document.vector), document.vector_model) == ("v", [1.0], "")
