"""The engine's rules a maintainer relies on (docs/architecture.md), checked on the code and on runs:
monitors only read, no module sets another module's attributes, no module branches on a backend's
name, no tensor identity in the monitors, no test file imports another, a thin entry script, the
weight modules imported one way, with weights.py the entry for all their names."""
import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import trans_utils
from engine_for_finetuning import simulate
from helpers import converted_family, feeds_that_run, images
from monitors import EnergyMonitor, SOPMonitor
from trans_utils import StatefulModule, set_backend

pytestmark = pytest.mark.usefixtures('single_thread')

ROOT = Path(__file__).resolve().parents[1]
#: The documented calls through which drivers and monitors set what modules hold: the clock of a
#: chunked run (MultiStep) and what records hold (a monitor, once when attached).
DOCUMENTED_CALLS = ('set_clock', 'set_recording')
#: What is done with weights, one module per job (docs/architecture.md), each importing only those
#: before it; weights.py, the entry both scripts call, last.
WEIGHT_MODULES = ('checkpoints', 'diagnosis', 'pretrained', 'records', 'weights')


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize('coding', ['rate', 'differential'])
@pytest.mark.parametrize('backend', ['native', 'eager'])
def test_no_module_or_monitor_sets_another_modules_attributes(monkeypatch, backend, coding):
    """Through a monitored, chunked simulation (SOP and energy monitors, level counts, fused modules
    where the backend fuses), every attribute set on a module is set by that module's own code:
    neither another module nor a monitor writes one, except through the documented calls
    (trans_utils.set_clock for the driver's clock, set_recording for what records hold)."""
    if trans_utils.backend_problem(backend, 'cpu'):
        pytest.skip(trans_utils.backend_problem(backend, 'cpu'))
    model = converted_family('eva02_tiny', levels=4, coding=coding)
    set_backend(model, backend)
    sop = SOPMonitor(model, count_levels=True, level_batches=1)
    energy = EnergyMonitor(model, sop)
    foreign = []
    original = nn.Module.__setattr__

    def spy(self, name, value):
        caller = sys._getframe(1)
        owner = caller.f_locals.get('self')
        if owner is not self and caller.f_code.co_name not in DOCUMENTED_CALLS:
            foreign.append((type(owner).__name__, caller.f_code.co_name, type(self).__name__, name))
        original(self, name, value)

    monkeypatch.setattr(nn.Module, '__setattr__', spy)
    with torch.no_grad():
        for x in (images(2, seed=5), images(3, seed=6)):  # the second batch turns level counting off
            simulate(model, x, 4, time_chunk=[1, 3], monitor=sop)
    monkeypatch.undo()
    assert not foreign, foreign
    assert sop.sops is not None and sop.level_counts() and energy.images == 5
    assert any(isinstance(m, StatefulModule) and m.last_record is not None for m in model.modules())


def test_no_code_matches_tensors_by_identity():
    """The monitors look producers up by name in the feed graph, and no other code outside the
    tests matches tensors by identity either: no weakref, no version counters, no data pointers
    (ECMT_SPEC's counts must not depend on how memory is reused). The one use allowed: the native
    backend hands tensors' addresses to its C++ library (ctypes arguments, not a comparison)."""
    sources = [p for p in ROOT.rglob('*.py') if 'tests' not in p.relative_to(ROOT).parts
               and not any(part.startswith('.') for part in p.relative_to(ROOT).parts)]
    assert ROOT / 'monitors.py' in sources and ROOT / 'kernels' / 'eager.py' in sources
    for path in sources:
        if path == ROOT / 'kernels' / 'native.py':
            continue
        name = str(path.relative_to(ROOT))
        tree = _tree(path)
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert 'weakref' not in imported, name
        assert not attributes & {'_version', 'data_ptr', 'ref'}, (name, attributes & {'_version', 'data_ptr', 'ref'})


def test_module_code_names_no_backend():
    """A module keeps the kernels it was given at conversion and asks them (EC_KINDS, FUSES,
    INPUT_DTYPES): no comparison with a backend's name in the modules or the models."""
    names = set(trans_utils.BACKENDS)
    # (calibration.py's statistics pick their own selection routine, whatever runs the SNN.)
    for name in ('trans_utils.py', 'model_base.py', 'multistep.py', 'monitors.py'):
        for node in ast.walk(_tree(ROOT / name)):
            if isinstance(node, ast.Compare):
                constants = {c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)}
                assert not constants & names, (name, node.lineno)


def test_kernels_give_one_protocol():
    """Every backend module offers each kernel of the Protocol, with the Protocol's leading
    positional parameters."""
    import kernels
    protocol = {name: inspect.signature(getattr(kernels.Kernels, name))
                for name in dir(kernels.Kernels) if not name.startswith('_') and callable(getattr(kernels.Kernels, name))}
    assert {'mt_steps', 'qkv_mt_steps', 'qkv_parts_mt_steps', 'ec_mt_steps', 'running_sums'} <= set(protocol)
    for backend in kernels.BACKENDS:
        module = kernels.BACKEND_TABLE[backend]
        if backend == 'triton' and trans_utils.backend_problem('triton', 'cpu'):
            continue
        loaded = __import__(module, fromlist=['_'])
        for name, signature in protocol.items():
            assert hasattr(loaded, name), (backend, name)
            wanted = [p for p in signature.parameters if p != 'self'][:3]
            got = list(inspect.signature(getattr(loaded, name)).parameters)[:3]
            assert got == wanted, (backend, name, got, wanted)
        for attribute in ('EC_KINDS', 'INPUT_DTYPES', 'FUSES'):
            assert hasattr(loaded, attribute), (backend, attribute)


def test_no_test_file_imports_another():
    """Shared test code lives in conftest.py and helpers modules, never in a test file."""
    tests = ROOT / 'tests'
    for path in tests.glob('test_*.py'):
        for node in ast.walk(_tree(path)):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not [m for m in modules if m.split('.')[0].startswith('test_')], (path.name, node.lineno)


@pytest.mark.parametrize('config', ['vit_cls_token', 'vit_layerscale_qknorm', 'eva_giant', 'eva02_tiny',
                                    'eva02_swiglu_norms', 'vit_rope_reg', 'siglip_map', 'deit_distilled'])
@pytest.mark.parametrize('fused', [True, False])
def test_the_declared_feed_graph_is_the_one_that_runs(config, fused):
    """The producers the monitors look up by name (trans_utils.feed_graph, from the convertible
    modules' ecmt_feeds) are the neurons whose outputs each linear layer and product receives in
    a run (found here, in the test only, by tensor identity and storage): every neuron-fed operand
    declared, nothing declared that is not so fed."""
    model = converted_family(config, levels=4)
    set_backend(model, 'native' if not trans_utils.backend_problem('native', 'cpu') else 'eager')
    trans_utils.fuse_ec_neurons(model, fused)
    ran, declared = feeds_that_run(model, images(2))
    assert ran == declared


def _imported_modules(path: Path) -> set:
    """The top-level names of the modules `path` imports, at the top or inside a function."""
    tree = _tree(path)
    return ({alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
            | {node.module.split('.')[0] for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module and node.level == 0})


def test_weight_modules_import_one_way():
    """checkpoints.py, diagnosis.py, pretrained.py, records.py, weights.py: each imports only the
    ones before it, even inside a function, so there is no import cycle and none of them imports
    the entry, weights.py; model_eva.py takes the layout filter and the resampling from their own
    modules, not through weights.py."""
    for i, name in enumerate(WEIGHT_MODULES):
        later = _imported_modules(ROOT / f'{name}.py') & set(WEIGHT_MODULES[i:])
        assert not later, (name, later)
    assert 'weights' not in _imported_modules(ROOT / 'model_eva.py')


def test_weights_is_the_entry_for_every_weight_name():
    """Every name the weight modules export (their __all__) is importable from weights, as the
    same object, and listed in weights.__all__: scripts and tests keep importing from weights."""
    import weights
    for name in WEIGHT_MODULES[:-1]:
        module = importlib.import_module(name)
        assert module.__all__, name
        for attribute in module.__all__:
            assert getattr(weights, attribute, None) is getattr(module, attribute), (name, attribute)
            assert attribute in weights.__all__, (name, attribute)
    assert all(hasattr(weights, attribute) for attribute in weights.__all__)
