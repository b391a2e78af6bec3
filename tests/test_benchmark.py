"""Benchmarking: FLOP counts against timm's published figures, and full runs in real subprocesses."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_flops import PUBLISHED, TOLERANCE
from cli.bench import parse_int_list
from cli.models import parse_input_size
from services.benchmark.report import LOG_COLUMNS, write_tables
from services.benchmark.runner import make_request, run_benchmarks
from shared.benchmark.flops import count_flops
from shared.benchmark.hardware import fingerprint
from shared.benchmark.measure import BUSY_CPU_SHARE, state_dict_bytes, top1
from shared.errors import InvalidArgument
from shared.models import create_model
from shared.preprocess import Preprocessor
from shared.quantize import quantize_int8

# Factories a spec can name as "module:function"; the measuring subprocess imports them from PYTHONPATH.
TEST_MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils._python_dispatch import _get_current_dispatch_mode


    class OpaqueNet(nn.Module):
        """Runs normally but cannot run under a dispatch mode, like a kernel FlopCounterMode cannot trace."""

        def __init__(self, in_chans, num_classes):
            super().__init__()
            self.fc = nn.Linear(in_chans * 28 * 28, num_classes)

        def forward(self, x):
            if _get_current_dispatch_mode() is not None:
                raise RuntimeError("opaque_kernel cannot run under a dispatch mode")
            return self.fc(x.flatten(1))


    class BrokenNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            raise RuntimeError("broken forward on purpose")


    def opaque(in_chans=1, num_classes=10):
        return OpaqueNet(in_chans, num_classes)


    def broken(in_chans=1, num_classes=10):
        return BrokenNet()
''')


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_gmacs_and_params_match_timm_published(name):
    # Meta tensors dispatch the same aten ops with shapes only, so the count costs no compute;
    # test_counts_on_real_tensors_equal_meta checks that the real-tensor path gives the same number.
    ref_gmacs, ref_params = PUBLISHED[name]
    with torch.device("meta"):
        model = create_model(name, num_classes=1000, in_chans=3).eval()
    flops, by_op = count_flops(model, torch.empty(1, 3, 224, 224, device="meta"))
    gmacs = flops / 2e9
    assert abs(gmacs - ref_gmacs) / ref_gmacs <= TOLERANCE, (name, gmacs, by_op)
    assert sum(p.numel() for p in model.parameters()) == ref_params


def test_counts_on_real_tensors_equal_meta():
    # DeiT-S exercises the CPU attention kernel torch's FlopCounterMode does not register.
    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224", num_classes=1000, in_chans=3).eval()
    x = torch.randn(1, 3, 224, 224)
    flops, by_op = count_flops(model, x)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in by_op
    assert "aten.native_layer_norm" in by_op
    with torch.device("meta"):
        meta_model = create_model("deit_small_patch16_224", num_classes=1000, in_chans=3).eval()
    assert count_flops(meta_model, torch.empty(1, 3, 224, 224, device="meta"))[0] == flops
    # Without the extra formulas the count misses the 3% bar: the additions are what make it right.
    with torch.no_grad(), FlopCounterMode(display=False) as stock:
        model(x)
    assert stock.get_total_flops() / 2e9 < PUBLISHED["deit_small_patch16_224"][0] * (1 - TOLERANCE)


def test_peak_anon_rss_sees_a_known_allocation():
    # In a fresh interpreter, as the benchmark measures: late in a long pytest process the allocator can
    # hold 64 MB of freed, still-resident heap and serve the block from it, which no RSS reading can see
    # (CI saw a 16 kB rise).
    code = textwrap.dedent("""
        import json, torch
        from shared.benchmark.memory import PeakAnonRss, anon_rss_bytes
        before = anon_rss_bytes()
        with PeakAnonRss() as probe:
            block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched, then freed inside the block
            del block
        print(json.dumps({"rise": probe.peak - before, "method": probe.method}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rise"] >= 60 * 2**20, result
    assert result["method"]


def test_int8_shrinks_linears_and_leaves_convs():
    mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    qmlp, layers = quantize_int8(mlp)
    assert layers == 2
    assert state_dict_bytes(qmlp) < state_dict_bytes(mlp) / 3
    x = torch.randn(16, 512)
    assert (qmlp(x) - mlp(x)).abs().max() < 0.05
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    assert quantize_int8(convnet)[1] == 0
    # timm's Linear subclass (MobileNetV3 / EfficientNet classifiers) is quantized too; MHA is not broken.
    from timm.layers import Linear as TimmLinear

    head = nn.Sequential(TimmLinear(512, 10)).eval()
    qhead, layers = quantize_int8(head)
    assert layers == 1 and type(head[0]) is TimmLinear
    assert (qhead(x) - head(x)).abs().max() < 0.05
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    qmha, _ = quantize_int8(mha)
    q = torch.randn(2, 5, 32)
    assert (qmha(q, q, q)[0] - mha(q, q, q)[0]).abs().max() < 0.05


def publish_to_store(tmp_path, monkeypatch, name: str, arch: str, seed: int, classes: list[str],
                     input_size: list[int], mean: list[float], std: list[float]):
    """A seeded ``arch`` published as ``models/<name>/1`` in a local store that TRAINYARD_STORE points at."""
    from safetensors.torch import save

    from shared.modelcard import ModelCard, publish_model
    from shared.storage import open_store

    url = f"file://{tmp_path / 'store'}"
    monkeypatch.setenv("TRAINYARD_STORE", url)
    torch.manual_seed(seed)
    kwargs = {"num_classes": len(classes), "in_chans": input_size[0]}
    model = create_model(arch, **kwargs).eval()
    card = ModelCard(name=name, version=1, architecture=arch, model_kwargs=kwargs, classes=classes,
                     input_size=input_size, normalization={"mean": mean, "std": std}, run_id="test")
    publish_model(open_store(url), card, save(dict(model.state_dict())))
    return model, card


def _same(a, b) -> bool:
    """Equal values, down to the int8 weights and their quantisation parameters."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        if a.is_quantized:
            return (b.is_quantized and torch.equal(a.int_repr(), b.int_repr()) and a.q_scale() == b.q_scale()
                    and a.q_zero_point() == b.q_zero_point())
        return torch.equal(a, b)
    return a == b


def test_int8_model_benchmarked_is_the_one_served(tmp_path, monkeypatch):
    """`trainyard bench` and `inference --quantize` build the int8 model through the same code: same weights,
    same outputs on the same batch, and timm's Linear classifier is int8 in both."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    from services.inference.repository import ModelRepository
    from shared.benchmark.measure import MeasureSpec, import_builder
    from shared.storage import open_store

    publish_to_store(tmp_path, monkeypatch, "q8", "mobilenetv3_small_050", 3, list("abcd"), [3, 32, 32],
                     [0.5] * 3, [0.25] * 3)
    url = f"file://{tmp_path / 'store'}"

    measured, _, _ = import_builder(MeasureSpec(model="store:models/q8/1"))()
    benched, layers = quantize_int8(measured.eval())
    repository = ModelRepository(open_store(url), quantize=True)
    try:
        served = repository.load("q8").module
        assert layers >= 1 and isinstance(served.classifier, DynLinear) and isinstance(benched.classifier, DynLinear)
        bench_state, served_state = benched.state_dict(), served.state_dict()
        assert bench_state.keys() == served_state.keys()
        for key, value in bench_state.items():
            assert _same(value, served_state[key]), key
        x = torch.randn(8, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(benched(x), served(x))
    finally:
        repository.close()


def test_request_validation():
    with pytest.raises(InvalidArgument, match="batch_sizes"):
        make_request(models=["resnet50"], batch_sizes=[0])
    with pytest.raises(InvalidArgument, match="models"):
        make_request(models=[])
    assert parse_input_size("3x224x224") == (3, 224, 224)
    with pytest.raises(InvalidArgument):
        parse_input_size("3x224")
    assert parse_int_list("1, 32") == [1, 32]
    assert make_request(models=["a"], batch_sizes=[32, 1, 32]).batch_sizes == [1, 32]


def test_hardware_fingerprint():
    hw = fingerprint("cpu")
    assert hw.cpu and hw.logical_cpus >= 1 and hw.usable_cpus >= 1
    assert hw.torch_version == torch.__version__
    assert hw.torch_threads == torch.get_num_threads()
    assert len(hw.digest) == 12


@pytest.fixture
def mnist_dir(tmp_path):
    """A tiny MNIST in IDX format (random digits: only the bookkeeping of accuracy is under test)."""
    from shared.data.mnist import write_idx

    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    for split, n in (("train", 8), ("t10k", 200)):
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return root


@pytest.fixture
def exported_model(tmp_path, monkeypatch):
    """mnist_ultralight published to a local store as models/ultra/1; returns (model, card)."""
    return publish_to_store(tmp_path, monkeypatch, "ultra", "mnist_ultralight", 1, [str(i) for i in range(10)],
                            [1, 28, 28], [0.1307], [0.3081])


def test_run_benchmarks_end_to_end(tmp_path, monkeypatch, mlflow_server, mnist_dir):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bench_test_models.py").write_text(TEST_MODELS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkg"))
    models = ["mnist_ultralight", "bench_test_models:opaque", "bench_test_models:broken"]
    events = []
    request = make_request(
        models=models, input_shape=(1, 28, 28), batch_sizes=[1, 64], warmup=2, iterations=20,
        throughput_seconds=0.1, threads=1, dataset=str(mnist_dir), tracking_uri=mlflow_server.uri,
        out=str(tmp_path / "out" / "results.md"),
    )
    results = run_benchmarks(request, progress=lambda done, total, model, res: events.append((done, model, res)))
    assert [r.model for r in results] == models
    assert [(d, m) for d, m, _ in events] == [(i + k, m) for i, m in enumerate(models) for k in (0, 1)]
    ultra, opaque, broken = results

    assert ultra.error is None and ultra.flops_error is None and ultra.memory_error is None, ultra
    assert ultra.params_total == ultra.params_trainable == 6_008
    assert ultra.gmacs > 0 and ultra.gflops == pytest.approx(2 * ultra.gmacs)
    assert ultra.counted_ops == ["aten.addmm", "aten.convolution"]
    assert 0 < ultra.latency_p50_ms <= ultra.latency_p90_ms <= ultra.latency_p99_ms
    assert ultra.latency_iterations == 20 and ultra.threads == 1 and ultra.hardware.torch_threads == 1
    assert set(ultra.throughput) == {1, 64} and all(v > 0 for v in ultra.throughput.values())
    assert ultra.peak_memory_mb > 0 and "anonymous RSS" in ultra.peak_memory_method
    assert ultra.size_fp32_mb > 0 and ultra.size_int8_mb > 0 and ultra.int8_latency_p50_ms > 0
    assert ultra.int8_quantized_layers == 2
    assert ultra.accuracy_samples == 200 and 0 <= ultra.accuracy_fp32 <= 100
    assert ultra.accuracy_delta == pytest.approx(ultra.accuracy_int8 - ultra.accuracy_fp32)
    assert all(r.mlflow_run_id and r.tracking_error is None for r in results)

    assert opaque.error is None and opaque.gflops is None
    assert "opaque_kernel cannot run under a dispatch mode" in opaque.flops_error
    assert opaque.latency_p50_ms > 0 and opaque.peak_memory_mb > 0
    assert broken.error and "broken forward on purpose" in broken.error

    # Tables: the log's columns first, read back; an uncounted FLOP figure shows its error, never blank.
    md, csv_path = tmp_path / "out" / "results.md", tmp_path / "out" / "results.csv"
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(LOG_COLUMNS)] == LOG_COLUMNS
        rows = {r["Model"]: r for r in reader}
    assert float(rows["mnist_ultralight"]["Params (M)"]) == pytest.approx(0.006, abs=1e-3)
    assert float(rows["mnist_ultralight"]["Peak Memory (MB)"]) > 0
    assert float(rows["mnist_ultralight"]["Throughput bs=64 (img/s)"]) > 0
    assert float(rows["mnist_ultralight"]["FLOPs (G)"]) == pytest.approx(ultra.gflops, rel=1e-3, abs=1e-3)
    assert "opaque_kernel cannot run under a dispatch mode" in rows["bench_test_models:opaque"]["FLOPs (G)"]
    assert "broken forward on purpose" in rows["bench_test_models:broken"]["Notes"]
    assert all(v.strip() for row in rows.values() for v in row.values())
    text = md.read_text()
    assert "| " + " | ".join(LOG_COLUMNS) in text
    assert "opaque_kernel cannot run under a dispatch mode" in text
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # write_tables given a .csv path writes the same set.
    assert set(write_tables(results, tmp_path / "again.csv")) == {"markdown", "csv", "plot"}

    # MLflow: one run per model in the "benchmarks" experiment, with the metrics and the full result.
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("benchmarks")
    for r in results:
        run = client.get_run(r.mlflow_run_id)
        assert run.info.experiment_id == exp.experiment_id and run.info.run_name == r.model
    run = client.get_run(ultra.mlflow_run_id)
    assert run.data.metrics["params_m"] == pytest.approx(0.006008)
    assert run.data.metrics["peak_memory_mb"] == pytest.approx(ultra.peak_memory_mb)
    assert run.data.metrics["throughput_bs64"] == pytest.approx(ultra.throughput[64])
    assert run.data.params["threads"] == "1"
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "benchmark.json", str(tmp_path))).read())
    assert logged["gmacs"] == ultra.gmacs
    assert "error" in client.get_run(broken.mlflow_run_id).data.tags


@pytest.mark.slow
def test_exported_model_from_store(mnist_dir, exported_model):
    request = make_request(models=["store:models/ultra/1"], batch_sizes=[1], warmup=2, iterations=10,
                           throughput_seconds=0.1, threads=1, dataset=str(mnist_dir), track=False)
    (stored,) = run_benchmarks(request)
    assert stored.error is None and stored.accuracy_error is None, stored
    # The input shape comes from the model card when the request leaves it unset.
    assert stored.input_shape == [1, 28, 28]
    assert stored.params_total == 6_008 and stored.gmacs > 0 and stored.peak_memory_mb > 0
    # Its accuracy is that of its weights with its card's normalisation, recomputed here.
    from shared.data.mnist import read_mnist

    model, card = exported_model
    test = read_mnist(mnist_dir)[1]
    x = Preprocessor.from_card(card)(test.images)
    assert stored.accuracy_samples == 200
    assert stored.accuracy_fp32 == pytest.approx(top1(model, x, test.labels), abs=0.5)
    assert stored.accuracy_delta == pytest.approx(stored.accuracy_int8 - stored.accuracy_fp32)


def _agree(a, b) -> bool:
    def close(x: float, y: float) -> bool:
        return abs(x - y) / min(x, y) <= 0.15

    # CPU time per call does not count time spent waiting for a core, so it repeats even on a busy box;
    # wall-clock medians are compared only when both runs had their core to themselves.
    idle = min(a.cpu_share, b.cpu_share) >= BUSY_CPU_SHARE
    return close(a.latency_cpu_p50_ms, b.latency_cpu_p50_ms) and (
        not idle or close(a.latency_p50_ms, b.latency_p50_ms))


@pytest.mark.slow
def test_latency_medians_repeat_within_15_percent():
    request = make_request(models=["mobilenetv3_large_100"], input_shape=(3, 224, 224), batch_sizes=[1],
                           warmup=10, iterations=60, throughput_seconds=0.1, threads=1, quantize=False,
                           track=False)
    # A shared VM's own speed wanders by up to ~27% between runs (measured here: ten runs of this model in
    # a row, and two pinned to different cores at the same moment; no in-process probe tracked it, and
    # disabling ASLR did not narrow it). So two runs are not enough to judge: the benchmark is run until two
    # of its medians agree, at most four times. Four medians pairwise more than 15% apart span over 50%,
    # which the host's noise alone has not produced.
    runs = []
    for _ in range(4):
        result = run_benchmarks(request)[0]
        assert result.error is None, result.error
        if any(_agree(result, earlier) for earlier in runs):
            return
        runs.append(result)
    pytest.fail("no two of four latency medians agree within 15%: " + "; ".join(
        f"cpu p50 {r.latency_cpu_p50_ms:.2f} ms, wall p50 {r.latency_p50_ms:.2f} ms" for r in runs))
