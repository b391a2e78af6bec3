"""The checked-in stubs are exactly what `make protos` generates from protos/."""
from pathlib import Path

from shared import protogen


def test_stubs_are_fresh(tmp_path: Path):
    written = protogen.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in written}
    checked_in = {p.name: p.read_text() for p in protogen.OUT_DIR.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(checked_in), "stub files differ: run `make protos` and commit"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}: run `make protos` and commit"


def test_inference_service_keeps_the_open_inference_protocol_name():
    from shared.pb import inference_pb2

    svc = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    # Unmodified KServe/Triton clients call this exact full name.
    assert svc.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in svc.methods} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }
    fields = inference_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert fields["raw_input_contents"].number == 7
