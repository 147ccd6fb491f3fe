"""Optional packages: `import glmtorch` pulls in none of them, and a command that needs a missing one stops with one
line naming the extra (checked by hiding installed packages from a subprocess's imports)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import glmtorch
from glmtorch.extras import EXTRAS, MissingDependency, install_hint, require

OPTIONAL = ["gguf", "sentencepiece", "google.protobuf", "huggingface_hub", "httpx", "matplotlib", "transformers",
            "fastapi", "uvicorn", "flash_attn"]

# Runs glmtorch in a fresh interpreter with some packages made unimportable, as if they were not installed.
HIDE = textwrap.dedent("""
    import sys
    HIDDEN = set(sys.argv[1].split(","))

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if any(name == h or name.startswith(h + ".") for h in HIDDEN):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Hide())
    sys.argv = sys.argv[1:]
""")


def run_hidden(hidden: list[str], code: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", HIDE + textwrap.dedent(code), ",".join(hidden), *args],
                          input=stdin, capture_output=True, text=True, timeout=300, env=env)


def run_cli_hidden(hidden: list[str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return run_hidden(hidden, "from glmtorch.cli import main\nsys.exit(main(sys.argv[1:]))", *args, stdin=stdin)


def test_import_glmtorch_imports_neither_torch_nor_optional_packages():
    result = run_hidden([], """
        import json, glmtorch
        print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
    """)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert "glmtorch" in loaded and not loaded & {"torch", "numpy", *(m.split(".")[0] for m in OPTIONAL)}


def test_help_builds_no_kernels_and_imports_no_torch():
    result = run_hidden([], """
        import contextlib, io
        from glmtorch.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
        print("torch" in sys.modules)
    """)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_every_module_imports_without_the_optional_packages():
    result = run_hidden(OPTIONAL, """
        import importlib, pkgutil, glmtorch
        for info in pkgutil.walk_packages(glmtorch.__path__, "glmtorch."):
            if not info.name.startswith(("glmtorch.serve", "glmtorch.__main__")):  # fastapi: base install
                importlib.import_module(info.name)
        from glmtorch import *  # every public name resolves
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_public_names_resolve_lazily_and_unknown_names_fail():
    for name in glmtorch.__all__:
        assert getattr(glmtorch, name) is not None
    assert glmtorch.GlmForCausalLM.__name__ == "GlmForCausalLM"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        glmtorch.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("hidden, args, extra", [
    (["fastapi"], ["serve", "--port", "1"], "serve"),
    (["uvicorn"], ["serve"], "serve"),
    (["httpx"], ["bench-serve", "http://127.0.0.1:9"], "bench"),
    (["gguf"], ["convert", glmtorch.DEMO_MODEL, "/nonexistent/out.gguf"], "gguf"),
    (["huggingface_hub"], ["generate", "THUDM/glm-4-9b-chat-hf", "--prompt", "hi"], "hub"),
])
def test_missing_extra_is_one_line_naming_it(hidden, args, extra):
    result = run_cli_hidden(hidden, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("glmtorch: error:") and result.stderr.count("\n") == 1, result.stderr
    assert f"pip install 'glmtorch[{extra}]'" in result.stderr and "Traceback" not in result.stderr


def test_gguf_checkpoint_without_gguf_is_one_line(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    result = run_cli_hidden(["gguf"], "generate", str(tmp_path / "model.gguf"), "--prompt", "hi")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'glmtorch[gguf]'" in result.stderr


def test_cli_turns_a_stray_missing_optional_import_into_one_line():
    """A deep import of an optional package that skipped require() still ends in the hint, not a traceback."""
    result = run_hidden(["matplotlib"], """
        from glmtorch import cli
        def boom(args):
            import matplotlib.pyplot  # noqa: F401
        cli.COMMANDS["chat"] = (*cli.COMMANDS["chat"][:2], boom)
        sys.exit(cli.main(["chat"]))
    """)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'glmtorch[bench]'" in result.stderr


def test_cli_lets_unknown_missing_modules_through_as_bugs():
    result = run_hidden([], """
        from glmtorch import cli
        def boom(args):
            import glmtorch_no_such_module  # noqa: F401
        cli.COMMANDS["chat"] = (*cli.COMMANDS["chat"][:2], boom)
        sys.exit(cli.main(["chat"]))
    """)
    assert result.returncode == 1 and "Traceback" in result.stderr  # not dressed up as a missing extra


def test_require_names_the_extra_and_passes_present_packages_through(monkeypatch):
    assert require("json").dumps([1]) == "[1]"
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(MissingDependency, match=r"^GGUF needs the 'gguf' package.*pip install 'glmtorch\[gguf\]'$") as e:
        require("gguf", "GGUF")
    assert isinstance(e.value, ImportError)
    assert install_hint("google.protobuf.message") == "pip install 'glmtorch[sentencepiece]'"
    assert install_hint("torch") is None
    assert all(extra in ("gguf", "sentencepiece", "hub", "bench", "serve", "train", "constrain")
               for extra, _ in EXTRAS.values())


def test_constrained_output_without_llguidance_is_one_line(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    result = run_cli_hidden(["llguidance"], "generate", "--prompt", "x", "--json-schema", str(schema))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pip install 'glmtorch[constrain]'" in result.stderr.strip().splitlines()[-1]


def test_every_extra_named_exists_in_pyproject():
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["optional-dependencies"]
    assert {extra for extra, _ in EXTRAS.values()} <= set(declared)
