"""Issue 14 items 20-21 on running services: the inference service's repository control (load/unload) needs
the repository token, and TLS through the one setting (TRAINYARD_TLS_DIR) for servers and clients alike.

The stack under test is a real `python -m services.inference` process started by `trainyard up`'s code with a
fresh TRAINYARD_HOME and TLS on; its certificates are made here with `cryptography` (nothing downloaded).
"""
from __future__ import annotations

import stat

import grpc
import pytest

from cli.local_stack import down, up
from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.errors import PermissionDenied, Unauthenticated
from shared.grpc_client import channel, channel_credentials, health_status, wait_serving
from shared.inference_client import InferenceClient
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.settings import REPOSITORY_TOKEN_FILE, load_settings
from shared.storage import open_store
from tests.harness import free_ports
from tests.harness.inference import publish_random
from tests.harness.tls import make_tls_dir

MODEL = "guarded"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`trainyard up inference` with TLS on and a published model served; the test process is its client, with
    the same TRAINYARD_HOME and TRAINYARD_TLS_DIR."""
    root = tmp_path_factory.mktemp("secured")
    tls = make_tls_dir(root / "tls")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINYARD_HOME", str(root / "home"))
        mp.setenv("TRAINYARD_TLS_DIR", str(tls))
        mp.setenv("TRAINYARD_SERVE_MODELS", MODEL)
        for var in ("TRAINYARD_STORE", "TRAINYARD_REPOSITORY_TOKEN"):
            mp.delenv(var, raising=False)
        publish_random(open_store(load_settings().store_url), MODEL, seed=7)
        grpc_port, metrics_port, http_port = free_ports(3)
        state = up(["inference"], ports={"inference": (grpc_port, metrics_port)}, http_port=http_port,
                   deadline_s=120)
        try:
            yield {"address": state["inference"]["address"], "home": root / "home", "tls": tls,
                   "rest": state["inference"]["rest"]}
        finally:
            down(grace_s=20)


def _stub(ch: grpc.Channel) -> inference_pb2_grpc.GRPCInferenceServiceStub:
    return inference_pb2_grpc.GRPCInferenceServiceStub(ch)


def test_tls_service_answers_a_tls_client_and_refuses_a_plaintext_one(stack, tmp_path):
    with channel(stack["address"]) as ch:  # TLS, from the setting
        assert _stub(ch).ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert health_status(stack["address"]) == "SERVING"
    with grpc.insecure_channel(stack["address"]) as plain, pytest.raises(grpc.RpcError) as err:
        _stub(plain).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not take the server's certificate either.
    other = channel_credentials(make_tls_dir(tmp_path / "other"))
    with grpc.secure_channel(stack["address"], other) as ch, pytest.raises(grpc.RpcError) as err:
        _stub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_local_stack_serves_rest_over_the_same_tls(stack):
    import ssl
    import urllib.error
    import urllib.request

    https = stack["rest"].replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(stack["tls"] / "ca.crt"))
    with urllib.request.urlopen(f"{https}/health/ready", context=context, timeout=10) as response:
        assert response.status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to a TLS port
        urllib.request.urlopen(f"{stack['rest']}/health/ready", timeout=10)


def test_local_stack_keeps_its_repository_token_private(stack):
    token_file = stack["home"] / REPOSITORY_TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token_file.read_text()) >= 32


def test_repository_control_refuses_missing_and_wrong_tokens(stack):
    address = stack["address"]
    with channel(address) as ch:
        stub = _stub(ch)
        unload = pb.RepositoryModelUnloadRequest(model_name=MODEL)
        for metadata in (None, (("authorization", "Bearer wrong-token"),), (("authorization", "wrong-token"),)):
            for rpc, request in (("RepositoryModelUnload", unload),
                                 ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=MODEL))):
                with pytest.raises(grpc.RpcError) as err:
                    getattr(stub, rpc)(request, metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc, metadata)
                assert "token" in err.value.details()
        # The index stays open, and nothing was unloaded.
        index = {(m.name, m.state) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
        assert (MODEL, "READY") in index
    with InferenceClient(address, token="wrong-token") as client, pytest.raises(Unauthenticated):
        client.unload_model(MODEL)
    with InferenceClient(address) as client:
        assert client.model_ready(MODEL)


def test_repository_control_accepts_the_token(stack):
    # The client reads the token `trainyard up` wrote, through the settings, as `trainyard predict` would.
    with InferenceClient(stack["address"]) as client:
        client.unload_model(MODEL)
        assert not client.model_ready(MODEL)
        client.load_model(MODEL)
        assert client.model_ready(MODEL)
    token = (stack["home"] / REPOSITORY_TOKEN_FILE).read_text()
    with channel(stack["address"]) as ch:
        _stub(ch).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL),
                                        metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    with InferenceClient(stack["address"], token=token) as client:
        assert not client.model_ready(MODEL)
        client.load_model(MODEL)


def test_repository_control_is_off_without_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRAINYARD_REPOSITORY_TOKEN", raising=False)
    store = open_store(tmp_path / "store")
    publish_random(store, MODEL, seed=8)
    repo = ModelRepository(store)
    host, _ = start_server(repo, [])
    address = f"127.0.0.1:{host.port}"
    try:
        wait_serving(address, deadline_s=60)
        with InferenceClient(address, token="anything") as client:
            with pytest.raises(PermissionDenied, match="disabled.*TRAINYARD_REPOSITORY_TOKEN"):
                client.load_model(MODEL)
            assert not client.model_ready(MODEL)
            assert client.repository_index()[0]["name"] == MODEL
    finally:
        host.stop(grace=1)
        repo.close()
