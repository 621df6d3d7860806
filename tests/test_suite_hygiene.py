"""The suite keeps to itself: its servers never take the port a user's own `python app.py` is on, and no test module
patches another library for the whole process when it is imported."""
import ast
from pathlib import Path

import gradio as gr
import pytest

TESTS = Path(__file__).parent


def test_a_test_server_given_no_port_fails_instead_of_taking_7860():
    with gr.Blocks() as demo:
        gr.Textbox()
    try:
        with pytest.raises(OSError, match="Cannot find empty port"):
            demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    finally:
        demo.close()


def import_time_statements(body):
    """The statements a module runs when imported: its top level and the blocks inside it, not function or class
    bodies."""
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield statement
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from import_time_statements(getattr(statement, field, []))


def patches_at_import(statement) -> bool:
    """An assignment to an attribute (`library.name = ...`) or a setattr/delattr call run at import time."""
    targets = {ast.Assign: lambda s: s.targets, ast.AugAssign: lambda s: [s.target],
               ast.AnnAssign: lambda s: [s.target], ast.Delete: lambda s: s.targets}
    if type(statement) in targets:
        return any(isinstance(target, ast.Attribute) for target in targets[type(statement)](statement))
    calls = [node for node in ast.walk(statement) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return any(call.func.id in ("setattr", "delattr") for call in calls)


def test_no_test_module_patches_another_library_when_imported():
    found = {}
    for module in sorted(TESTS.glob("*.py")):
        statements = import_time_statements(ast.parse(module.read_text()).body)
        found[module.name] = [ast.unparse(s).splitlines()[0] for s in statements if patches_at_import(s)]
    assert {name: patches for name, patches in found.items() if patches} == {}, "use monkeypatch in a fixture"
    assert len(found) > 30  # every module was read
