"""The heap-growth check the no-allocation tests rely on must see a small leak made with the runtime on the stack,
and nothing when the same code only allocates temporaries."""

import os

from conftest import RUNTIME_DIR, runtime_heap_growth

# code compiled under a file name in runtime/ counts as the runtime's own
_WHERE = os.path.join(RUNTIME_DIR, "heap_check_probe.py")


def test_sees_a_small_leak():
    leak = []
    code = compile("leak.append(bytearray(30))", _WHERE, "exec")
    assert runtime_heap_growth(lambda i: exec(code, {"leak": leak})) >= 1024


def test_temporaries_are_not_growth():
    code = compile("x = bytearray(30)", _WHERE, "exec")
    assert runtime_heap_growth(lambda i: exec(code, {})) < 1024


def test_growth_outside_the_runtime_is_not_counted():
    leak = []
    code = compile("leak.append(bytearray(30))", os.path.abspath(__file__), "exec")
    assert runtime_heap_growth(lambda i: exec(code, {"leak": leak})) < 1024
