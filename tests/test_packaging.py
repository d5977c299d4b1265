"""What a user installs: the plain library, and the extras by need."""

import ast
import os
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Import names of the distributions pyproject.toml names.
IMPORT_NAMES = {
    "keras": "keras",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "scikit-learn": "sklearn",
    "matplotlib": "matplotlib",
}


def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def distribution_name(requirement):
    for separator in "<>=![; ":
        requirement = requirement.split(separator)[0]
    return requirement


def top_level_imports(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def test_the_plain_install_is_the_library_with_keras_numpy_and_scipy():
    plain = {distribution_name(r) for r in project()["dependencies"]}
    assert plain == {"keras", "numpy", "safetensors", "scipy"}
    extras = project()["optional-dependencies"]
    # One backend each, then the extras by need.
    assert {"torch", "jax", "tensorflow", "hub", "peft", "examples", "test"} <= set(
        extras
    )
    assert {distribution_name(r) for r in extras["hub"]} == {"keras-hub"}
    assert "peft" in {distribution_name(r) for r in extras["peft"]}


def test_the_quickstart_needs_only_the_plain_install_and_its_extra():
    extras = project()["optional-dependencies"]
    installed = {
        IMPORT_NAMES[distribution_name(r)]
        for r in project()["dependencies"] + extras["examples"]
    }
    imports = top_level_imports(os.path.join(ROOT, "examples", "quickstart.py"))
    assert imports - {"keras_pvera"} <= installed, imports


# Its process runs on torch whatever the run's backend.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_importing_the_library_loads_no_optional_package():
    # Keras itself imports what it finds (JAX, scikit-learn...); keras_pvera
    # adds none of the extras' packages on top.
    code = (
        "import sys, keras; before = set(sys.modules); import keras_pvera; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    env = dict(os.environ, KERAS_BACKEND="torch")
    output = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    loaded = set(ast.literal_eval(output.strip().splitlines()[-1]))
    optional = {"keras_hub", "tensorflow", "peft", "transformers", "sklearn"}
    optional |= {"matplotlib", "scipy", "jax"}
    assert not loaded & optional, loaded


def readme_commands():
    """The lines of README.md's `bash` blocks."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = f.read().split("```bash\n")[1:]
    return [line for block in blocks for line in block.split("```")[0].splitlines()]


# Reading files, whatever the backend: the torch run is enough.
@pytest.mark.default_backend_only
def test_ci_runs_readme_s_test_command_after_installing_as_it_does():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read().splitlines()
    # README's full test command: the install, then what CI runs as it is.
    (command,) = [line for line in readme_commands() if "lint-imports" in line]
    install, separator, tests = command.partition(" && ruff check")
    assert separator and "ruff check" + tests in ci
    # CI installs the same distributions (pip -q, python3 -m pip).
    installs = [
        line.split("pip install -q ")[1] for line in ci if "pip install -q" in line
    ]
    readme_installs = [part.split("pip install ")[1] for part in install.split(" && ")]
    assert readme_installs == installs[:2]
    # The fast tier is the torch run of the same suite, less the slow tests.
    fast = [line for line in readme_commands() if '-m "not slow"' in line]
    assert fast == [
        install
        + ' && KERAS_BACKEND=torch python3 -m pytest tests -m "not slow" -q -n 2'
    ]


# Reading files, whatever the backend: the torch run is enough.
@pytest.mark.default_backend_only
def test_the_main_job_command_installs_no_cuda_build():
    # PyPI's torch wheel for Linux brings CUDA's libraries (several GB) and
    # so does TensorFlow's `tensorflow` (not `tensorflow-cpu`); JAX's runs
    # on the CPU. README's main-job command installs extras without them.
    (command,) = [line for line in readme_commands() if "quickstart.py" in line]
    extras = command.split('pip install ".[')[1].split("]")[0].split(",")
    requirements = [
        r for extra in extras for r in project()["optional-dependencies"][extra]
    ]
    bundling_cuda = {"torch", "tensorflow"}
    assert not {distribution_name(r) for r in requirements} & bundling_cuda
    backend = command.split("KERAS_BACKEND=")[1].split()[0]
    assert backend in extras, (backend, extras)
