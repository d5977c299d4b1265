import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_adapts_the_pretrained_model_to_all_ten_digits(capsys):
    quickstart = load_example("quickstart")
    before, after = quickstart.main(pretrain_epochs=5, adapt_epochs=8)
    printed = capsys.readouterr().out
    assert "2 adapted layers" in printed
    assert "test accuracy after PVeRA" in printed
    # Pretrained on five of ten digits: about half right; adapted: far more.
    assert before < 0.6
    assert after > before + 0.2
