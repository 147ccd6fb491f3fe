"""The package's import layers (README "Layout"): every import, lazy ones inside functions included, goes to a
module of the same layer or one below, and no modules import each other in a circle. Walked with `ast`, so an
import added anywhere in src/ is checked."""

import ast
import os

import glmtorch

ROOT = os.path.dirname(glmtorch.__file__)

# layer -> its modules, lowest first: the data path, checkpoint files -> config -> model -> fast paths ->
# loading and generation -> the public classes -> what is built on them -> the command line
LAYERS = [
    ("utilities", ["glmtorch.extras", "glmtorch.cpuinfo", "glmtorch.device", "glmtorch.outputs", "glmtorch.losses", "glmtorch.chat",
                   "glmtorch.hugepages", "glmtorch.kernels", "glmtorch.dispatch", "glmtorch.sentencepiece_backend",
                   "glmtorch.generation", "glmtorch.serve"]),
    ("checkpoint I/O", ["glmtorch.checkpoint.resolve", "glmtorch.checkpoint.safetensors_io"]),
    ("config and tokenizer", ["glmtorch.config", "glmtorch.tokenizer"]),
    ("model math", ["glmtorch.attention", "glmtorch.cache", "glmtorch.modeling"]),
    ("checkpoint formats", ["glmtorch.checkpoint", "glmtorch.checkpoint.formats", "glmtorch.checkpoint.stream", "glmtorch.checkpoint.thudm",
                            "glmtorch.checkpoint.gguf"]),
    ("fast paths", ["glmtorch.quantize", "glmtorch.fastpath", "glmtorch.parallel"]),
    ("loading and generation", ["glmtorch.loading", "glmtorch.generation.config", "glmtorch.generation.processors",
                                "glmtorch.generation.sampling", "glmtorch.generation.stopping",
                                "glmtorch.generation.loop", "glmtorch.generation.streaming",
                                "glmtorch.generation.mixin", "glmtorch.generation.constrain",
                                "glmtorch.generation.speculate"]),
    ("public classes", ["glmtorch.models", "glmtorch.auto", "glmtorch"]),
    ("applications", ["glmtorch.train", "glmtorch.bench", "glmtorch.checkpoint.convert", "glmtorch.serve.blocks",
                      "glmtorch.serve.engine", "glmtorch.serve.metrics", "glmtorch.serve.offline",
                      "glmtorch.serve.app", "glmtorch.serve.server", "glmtorch.serve.bench"]),
    ("command line", ["glmtorch.cli", "glmtorch.__main__"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}


def package_modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = "glmtorch." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The glmtorch modules `module` imports anywhere in its file (top level or inside functions)."""
    found = set()
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:  # `from . import kernels` imports a module; `from .x import y` imports x
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "glmtorch" and m != module}


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    assert set(package_modules()) == set(LAYER), "add the new module to LAYERS (and README's Layout)"


def test_no_import_goes_up_a_layer():
    upward = [f"{m} ({LAYERS[LAYER[m]][0]}) imports {d} ({LAYERS[LAYER[d]][0]})"
              for m, deps in graph().items() for d in sorted(deps) if LAYER[d] > LAYER[m]]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges, state, circles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_the_check_sees_lazy_imports(tmp_path):
    """A test that cannot fail is a defect: an import inside a function, going up, is found."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from .serve.app import create_app\n")
    modules = {**package_modules(), "glmtorch.probe": str(source)}
    assert imports_of("glmtorch.probe", str(source), modules) == {"glmtorch.serve.app"}


def test_modeling_is_only_math():
    allowed = {"glmtorch.attention", "glmtorch.cache", "glmtorch.config", "glmtorch.outputs", "glmtorch.losses"}
    assert graph()["glmtorch.modeling"] <= allowed
