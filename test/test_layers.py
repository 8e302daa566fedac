"""The package's import layers (CONTRIBUTING.md, "Layout"): a module imports only its own
layer or below, at the top of its file; no import cycle; no ``_private`` name crosses units.

A unit is a top-level module or subpackage of ``int4tensor``. Read from the source with
``ast``, so the test sees function-level imports too and imports nothing.
"""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "int4tensor"

#: unit -> (layer, group). Layer 3 has two groups that must not import each other.
LAYERS = {
    "version": (0, ""), "quant_primitives": (0, ""), "qparams": (0, ""),
    "kernels": (1, ""),
    "tensors": (2, ""),
    **{u: (3, "model") for u in ("config", "quantize", "convert", "model_surgery",
                                 "compile_support", "explain")},
    **{u: (3, "files") for u in ("serialization", "formats")},
    **{u: (4, "") for u in ("calibration", "checkpoint", "integrations", "native_format")},
    "cli": (5, ""), "__main__": (5, ""),
    "__init__": (6, ""),  # the package facade imports everything; nothing imports it
}
SHIMS = {"algorithms"}  # kept one release for users; nothing inside the package imports them
#: (importing file, imported module) function-level imports that stay deferred, and why.
DEFERRED = {
    ("cli.py", "int4tensor.checkpoint"): "the CLI starts before loading its workflows",
    ("integrations/_autoload.py", "int4tensor.integrations.transformers"):
        "imports transformers, optional: only once the user has imported it",
}


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        parts = list(rel.with_suffix("").parts)
        name = ".".join(["int4tensor", *parts[:-1]] + ([] if parts[-1] == "__init__" else
                                                       [parts[-1]]))
        yield rel.as_posix(), name, ast.parse(path.read_text(), str(path))


MODULES = {name: (rel, tree) for rel, name, tree in modules()}
USES_TRITON = {n for n, (_, t) in MODULES.items() for s in t.body
               if isinstance(s, ast.Import) and any(a.name == "triton" for a in s.names)}


def unit(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(tree):
    """``(target module, imported names, at top level?)`` of each ``int4tensor`` import."""
    top = {id(s) for s in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("int4tensor"):
                    yield a.name, [], id(node) in top
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("int4tensor"):
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{node.module}.{a.name}"
                yield (sub, [], id(node) in top) if sub in MODULES else \
                    (node.module, [a.name], id(node) in top)


def test_imports_point_down_are_at_top_and_public():
    problems = []
    for name, (rel, tree) in MODULES.items():
        src = unit(name)
        for target, names, at_top in imports(tree):
            dst = unit(target)
            if dst in SHIMS and src not in SHIMS:
                problems.append(f"{rel}: imports the shim {target}")
                continue
            if src not in SHIMS:
                (ls, gs), (ld, gd) = LAYERS[src], LAYERS[dst]
                if ld > ls or (ld == ls == 3 and gs != gd):
                    problems.append(f"{rel}: {src} (layer {ls}{gs}) imports {target} "
                                    f"(layer {ld}{gd})")
            if not at_top and target not in USES_TRITON and (rel, target) not in DEFERRED:
                problems.append(f"{rel}: function-level import of {target}")
            private = [p for p in target.split(".") + names
                       if p.startswith("_") and not p.startswith("__")]
            if private and dst != src and src != "__init__":
                problems.append(f"{rel}: imports private {private} from unit {dst}")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    graph = {n: {t for t, _, _ in imports(tree) if t in MODULES}
             for n, (_, tree) in MODULES.items()}
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            assert state.get(m) != "open", "cycle: " + " -> ".join(path + [m])
            if m not in state:
                visit(m, path + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_every_unit_has_a_layer():
    assert {unit(n) for n in MODULES} - SHIMS <= set(LAYERS)


#: The base-class protocol's short names, for the ops inside tensors/ only; other units use
#: ``inner_tensors()`` / ``attribute_values()`` / ``from_fields()`` / ``attribute_defaults``.
PROTOCOL_SHORT_NAMES = {"_tensors", "_attributes", "_build", "_state_defaults"}


def test_tensor_protocol_is_used_by_its_public_names_outside_tensors():
    used = [f"{rel}:{node.lineno}: .{node.attr}" for name, (rel, tree) in MODULES.items()
            if unit(name) != "tensors" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in PROTOCOL_SHORT_NAMES]
    assert not used, "\n".join(used)
