"""The package's shape: docs/DESIGN.md lists every module and the public names, and the import rules hold on
the import graph: library modules never import a command or the public facade, scoring reaches no trainers
module, benchmarks call library functions."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dali_lens")
COMMANDS = ("commands.train", "generate", "commands.predict", "check", "evaluate", "pack", "inspect")
#: dali_lens/train.py and predict.py: `python -m` shims of commands.train / commands.predict (tests/test_api.py)
SHIMS = ("dali_lens.train", "dali_lens.predict")
#: the public facade: the package's own names (dali_lens/__init__.py, imported on first use) and api.py behind them
FACADE = ("dali_lens", "dali_lens.api")
#: the scoring side (predict, evaluate): it reads checkpoints through the neutral dali_lens.checkpoint and writes
#: rows through prediction_rows, and reaches no dali_lens.trainers module, not even through another module
SCORING_SIDE = ("dali_lens.scoring", "dali_lens.inference", "dali_lens.predictions", "dali_lens.score_inputs",
                "dali_lens.evaluation", "dali_lens.checkpoint", "dali_lens.prediction_rows")


def modules() -> dict[str, str]:
    """{'dali_lens.data.sources': path, ...} for every module file of the package."""
    out = {}
    for dirpath, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def design_layout() -> set[str]:
    """Module paths relative to dali_lens/ listed in DESIGN.md's layout block (package folders end in '/')."""
    text = open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8").read()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed, packages = set(), []  # packages: the folders the current line is in, one per indent level
    for line in block.splitlines()[2:]:  # after "dali_lens/"
        if not line.strip() or line.startswith(" " * 12):
            continue  # continuation of a description
        level = (len(line) - len(line.lstrip())) // 2 - 1  # 0 for dali_lens/'s own entries
        first = line.split()[0]
        packages = packages[:level]
        if first.endswith("/"):
            packages.append(first)
            continue
        names = [w for w in line.split() if w.endswith(".py")] if level == 0 else []
        if len(names) > 1:  # the row of commands
            listed.update(names)
        elif first.endswith(".py") and len(packages) == level:
            listed.add("".join(packages) + first)
    return listed


def test_design_lists_every_module():
    actual = {os.path.relpath(p, PKG).replace(os.sep, "/") for p in modules().values()}
    listed = design_layout()
    assert not actual - listed, f"modules missing from docs/DESIGN.md's layout: {sorted(actual - listed)}"
    assert not listed - actual, f"docs/DESIGN.md lists modules that do not exist: {sorted(listed - actual)}"


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in the file (also inside functions)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names]
            # ``from . import inspection`` imports the submodule, not the package's own names
            candidates = subs if all(c in known for c in subs) else [target] + subs
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def command_modules(mods) -> set[str]:
    """Every command module: COMMANDS, the ``python -m`` shims and the dali_lens.commands package."""
    return {f"dali_lens.{c}" for c in COMMANDS} | set(SHIMS) | {m for m in mods if m.startswith("dali_lens.commands")}


def test_library_never_imports_a_command_or_the_facade():
    """Library modules (all but the commands, the shims and the facade itself) import neither a command module
    nor the public facade (``dali_lens``'s own names, ``dali_lens.api``): the facade sits on the library."""
    mods = modules()
    commands = command_modules(mods)
    upward = {(m, t) for m, p in mods.items() if m not in commands and m not in FACADE
              for t in imports_of(m, p, set(mods)) if t in commands or t in FACADE}
    assert not upward, f"library modules importing a command or the public facade: {sorted(upward)}"


def reached(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """{module: the import path from ``start`` to it} for every module ``start`` imports, directly or not."""
    paths, todo = {start: [start]}, [start]
    while todo:
        m = todo.pop(0)
        for t in sorted(graph.get(m, ())):
            if t not in paths:
                paths[t] = paths[m] + [t]
                todo.append(t)
    del paths[start]
    return paths


def test_scoring_reaches_no_trainers_module():
    """Scoring, inference, predictions (and the checkpoint and row modules they share with the trainers) import no
    ``dali_lens.trainers`` module, directly or through another module: predict and evaluate need no trainer."""
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    bad = [" -> ".join(path) for m in SCORING_SIDE for t, path in reached(graph, m).items()
           if t == "dali_lens.trainers" or t.startswith("dali_lens.trainers.")]
    assert not bad, f"the scoring side reaches the trainers: {bad}"


#: benchmarks allowed to import a command for now, each (benchmark, command module) with its reason: none (wt-cli
#: gave evaluate and pack library cores; bench_autoscale and bench_shards call them)
BENCHMARK_COMMAND_IMPORTS_TO_REMOVE: set = set()


def test_benchmarks_call_library_functions_not_commands():
    """A benchmark measures the library: it imports library modules (or the public API), not a command module."""
    mods = modules()
    commands = command_modules(mods)
    bench = os.path.join(ROOT, "benchmarks")
    found = {(f"benchmarks.{f[:-3]}", t) for f in sorted(os.listdir(bench)) if f.endswith(".py")
             for t in imports_of(f"benchmarks.{f[:-3]}", os.path.join(bench, f), set(mods)) if t in commands}
    new = found - BENCHMARK_COMMAND_IMPORTS_TO_REMOVE
    assert not new, f"benchmarks importing a command (call its library function instead): {sorted(new)}"
    gone = BENCHMARK_COMMAND_IMPORTS_TO_REMOVE - found
    assert not gone, f"these are gone: remove them from BENCHMARK_COMMAND_IMPORTS_TO_REMOVE: {sorted(gone)}"


def test_import_rules_see_planted_imports(tmp_path):
    """The rules are not vacuous: a lazy import of the facade, of a trainers module two steps away, and of a
    command from a benchmark are found; ``from . import submodule`` is not an import of the package's names."""
    known = {"dali_lens", "dali_lens.api", "dali_lens.inspection", "dali_lens.x", "dali_lens.trainers.runner",
             "dali_lens.evaluate"}
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from . import inspection\n    from .api import describe\n")
    assert imports_of("dali_lens.y", str(planted), known) == {"dali_lens.inspection", "dali_lens.api"}
    planted.write_text("import dali_lens\nfrom . import x\n")
    assert imports_of("dali_lens.y", str(planted), known) == {"dali_lens", "dali_lens.x"}
    graph = {"dali_lens.inference": {"dali_lens.x"}, "dali_lens.x": {"dali_lens.trainers.runner"}}
    assert reached(graph, "dali_lens.inference")["dali_lens.trainers.runner"] == [
        "dali_lens.inference", "dali_lens.x", "dali_lens.trainers.runner"]
    planted.write_text("def main():\n    from dali_lens import evaluate\n")
    assert "dali_lens.evaluate" in imports_of("benchmarks.z", str(planted), known)


def public_names_in_design() -> list[str]:
    """The first column of DESIGN.md's "Public API" table."""
    text = open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8").read()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip().strip("`") for line in section.splitlines()
            if line.startswith("| `")]


def test_design_lists_exactly_the_public_names():
    import dali_lens

    listed = public_names_in_design()
    assert len(listed) == len(set(listed)), f"listed twice in docs/DESIGN.md: {listed}"
    assert sorted(listed) == sorted(dali_lens.__all__), (
        f"docs/DESIGN.md's Public API and dali_lens.__all__ differ: only in DESIGN "
        f"{sorted(set(listed) - set(dali_lens.__all__))}, only in __all__ {sorted(set(dali_lens.__all__) - set(listed))}")


def test_commands_do_not_import_each_other():
    mods = modules()
    commands = {f"dali_lens.{c}" for c in COMMANDS}
    crossing = {(m, t) for m in commands for t in imports_of(m, mods[m], set(mods)) if t in commands}
    assert not crossing, f"commands importing another command (move the shared part into the library): {crossing}"


def test_import_rule_sees_a_planted_upward_import(tmp_path):
    """The import check is not vacuous: a function-level relative import of a command is found."""
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from ..check import main\n    return main\n")
    assert imports_of("dali_lens.data.x", str(planted), {"dali_lens.check"}) == {"dali_lens.check"}


# Cycles allowed for now: none (issue #16 broke the last four). A future exception goes here, with its reason.
KNOWN_CYCLES: set = set()


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), in the import graph ``graph``."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two modules of the package import each other, directly or through others (imports inside functions
    count: a lazy import hides a cycle, it does not remove it). A package's __init__ is a module here."""
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    cycles = set(import_cycles(graph))
    new = cycles - KNOWN_CYCLES
    assert not new, f"import cycles: {[sorted(c) for c in new]}"
    gone = KNOWN_CYCLES - cycles
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


def test_cycle_finder_sees_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [frozenset({"a", "b", "c"})]


def test_every_command_exits_through_run_command():
    """Exit codes have one home (cli.run_command: 2 for bad input, 130 on Ctrl-C): every command's main() calls it."""
    missing = []
    for c in COMMANDS:
        tree = ast.parse(open(os.path.join(PKG, *c.split(".")[:-1], c.split(".")[-1] + ".py"), encoding="utf-8").read())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = {n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        if "run_command" not in calls:
            missing.append(c)
    assert not missing, f"commands whose main() does not exit through cli.run_command: {missing}"


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    """check and generate, like the other commands: Ctrl-C is exit status 130 and a line, not a traceback."""
    from dali_lens import check, generate
    from dali_lens.data import synthetic

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_dataset", interrupt)
    assert generate.main([str(tmp_path / "g"), "--n", "4", "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(check, "check", interrupt)
    assert check.main([str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_benchmarks_are_a_package_without_path_hacks_cycles_or_patches():
    """benchmarks/ runs as `python -m benchmarks.<name>`: no module edits sys.path, none imports another in a
    cycle, and none patches the library at run time (assigns to an attribute of something imported from
    dali_lens): a benchmark measures the library as it is."""
    bench = os.path.join(ROOT, "benchmarks")
    assert os.path.exists(os.path.join(bench, "__init__.py"))
    mods = {f"benchmarks.{f[:-3]}".removesuffix(".__init__"): os.path.join(bench, f)
            for f in os.listdir(bench) if f.endswith(".py")}
    problems = []
    for name, path in mods.items():
        text = open(path, encoding="utf-8").read()
        if "sys.path" in text:
            problems.append(f"{name} edits sys.path")
        tree = ast.parse(text)
        from_lib = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, (ast.Import, ast.ImportFrom))
                    and ((n.module or "") if isinstance(n, ast.ImportFrom) else n.names[0].name).startswith("dali_lens")
                    for a in n.names}
        for n in ast.walk(tree):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []):
                root = t
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(t, ast.Attribute) and isinstance(root, ast.Name) and root.id in from_lib:
                    problems.append(f"{name} line {n.lineno} patches the library ({ast.unparse(t)})")
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    problems += [f"import cycle {sorted(c)}" for c in import_cycles(graph)]
    assert not problems, problems


#: a command module is a thin CLI over one typed library call: its parser, main and the call (issue 23)
COMMAND_LINES = 120


def test_every_command_module_is_thin():
    mods = modules()
    lines = {c: len(open(mods[f"dali_lens.{c}"], encoding="utf-8").read().splitlines()) for c in COMMANDS}
    too_long = {c: n for c, n in lines.items() if n >= COMMAND_LINES}
    assert not too_long, f"command modules of {COMMAND_LINES} lines or more (move the logic to the library): {too_long}"
