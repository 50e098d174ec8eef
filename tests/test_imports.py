"""The package's structure: no import cycle, no tool importing another, one home per shared name;
the benchmarks (outside the package) share only their common modules.

Imports inside functions count too: a cycle hidden in a function is still a cycle.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "msca_jax")
BENCHMARKS = os.path.join(ROOT, "benchmarks")
# What one benchmark may import of the others: the shared modules, and the train step as
# benchmark.py builds it, which torch_reference_benchmark times against PyTorch's.
SHARED_BENCHMARK_MODULES = {"benchmarks.common", "benchmarks.step_analysis"}
ALSO_ALLOWED = {"benchmarks.torch_reference_benchmark": {"benchmarks.benchmark"}}


def _modules(top: str = PACKAGE) -> dict[str, ast.Module]:
  found = {}
  for folder, _, names in os.walk(top):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        with open(path, encoding="utf-8") as f:
          found[module] = ast.parse(f.read(), path)
  return found


def _imports(module: str, tree: ast.Module, known: set[str]) -> set[str]:
  """The package's modules that `module` imports, anywhere in its body."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    out.update(t for t in targets if t in known)
  out.discard(module)
  return out


def _graph(top: str = PACKAGE):
  modules = _modules(top)
  known = set(modules)
  return modules, {m: _imports(m, tree, known) for m, tree in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      # A package's __init__ importing its own submodules is not a cycle with them.
      if node.startswith(nxt + ".") or nxt.startswith(node + "."):
        continue
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycle_in_the_package():
  _, graph = _graph()
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_tool_imports_another_tool():
  _, graph = _graph()
  tools = {m for m in graph if m.startswith("msca_jax.tools.")}
  crossed = {m: sorted(graph[m] & tools) for m in sorted(tools) if graph[m] & tools}
  assert not crossed, crossed


def test_benchmarks_import_only_the_shared_modules_of_each_other():
  _, graph = _graph(BENCHMARKS)
  programs = set(graph) - SHARED_BENCHMARK_MODULES - {"benchmarks"}
  assert {"benchmarks.benchmark", "benchmarks.input_benchmark"} <= programs
  crossed = {m: sorted(graph[m] & programs - ALSO_ALLOWED.get(m, set())) for m in sorted(graph)}
  assert not any(crossed.values()), crossed
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_library_never_imports_the_repositorys_configs_launch_or_benchmarks():
  modules, _ = _graph()
  found = []
  for module, tree in modules.items():
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
      found += [f"{module}: {n}" for n in names
                if n.split(".")[0] in ("configs", "launch", "benchmarks")]
  assert not found, found


def test_shared_names_have_one_home():
  modules, _ = _graph()
  homes = {"DataError": "msca_jax.data.errors", "DecodeSettings": "msca_jax.data.decode",
           "UserError": "msca_jax.errors"}
  wrong = []
  for module, tree in modules.items():
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef) and node.name in homes and module != homes[node.name]:
        wrong.append(f"{module} defines {node.name}")
      if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in homes
                                              for t in node.targets):
        wrong.append(f"{module} renames {[t.id for t in node.targets]}")
      if isinstance(node, ast.ImportFrom) and node.module:
        wrong += [f"{module} imports {a.name} from {node.module}" for a in node.names
                  if a.name in homes and node.module != homes[a.name]]
      if (isinstance(node, ast.Attribute) and node.attr in homes and isinstance(node.value, ast.Name)
          and node.value.id != homes[node.attr].rsplit(".", 1)[1]):
        wrong.append(f"{module} names {node.value.id}.{node.attr}")
  assert not wrong, wrong
