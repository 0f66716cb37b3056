"""The CUDA path: a converted model on a GPU with the triton backend (and the eager one), held to
``reference.ref_simulate`` (the literal step-by-step network, run on the CPU in float32), under
float32 and under fp16/bf16 autocast, and the distributed reductions over NCCL with two processes.
Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them
(python -m pytest -m cuda tests/test_cuda.py)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engine_for_finetuning import simulate
from reference import ref_simulate
from helpers import CHUNKINGS, FAMILIES, converted_family, images
from trans_utils import StatefulModule, set_backend

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

T = 8


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 (convolutions default to it): the comparisons below are of float32 arithmetic."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def on_gpu(model, backend):
    gpu = set_backend(copy.deepcopy(model).cuda(), backend)
    assert {m.backend for m in gpu.modules() if isinstance(m, StatefulModule)} == {backend}
    return gpu


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('backend', ['triton', 'eager'])
@pytest.mark.parametrize('config', FAMILIES)
def test_cuda_per_step_logits_equal_the_reference(config, backend):
    model = converted_family(config)
    x = images(4)
    want = ref_simulate(model, x, T)
    gpu = on_gpu(model, backend)
    with torch.no_grad():
        runs = {chunks: simulate(gpu, x.cuda(), T, time_chunk=sizes).cpu() for chunks, sizes in CHUNKINGS.items()}
    # CUDA's products and transcendentals round differently from the CPU's, which may move a
    # membrane across a threshold edge now and then: a tolerance, per step.
    for chunks, got in runs.items():
        assert got.shape == want.shape
        for t in range(T):
            assert relative(got[t], want[t]) < 2e-3, (chunks, t)


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
def test_cuda_autocast_keeps_float32_state_and_the_float32_result_at_T32(amp):
    model = converted_family('vit_layerscale_qknorm', levels=16)
    gpu = on_gpu(model, 'triton')
    x = images(4).cuda()
    dtypes = set()

    def record(module, inputs, output):
        state = module.state if isinstance(module.state, tuple) else (module.state,)
        dtypes.update(t.dtype for t in state if t is not None)
    hooks = [m.register_forward_hook(record) for m in gpu.modules() if isinstance(m, StatefulModule)]
    with torch.no_grad():
        want = simulate(gpu, x, 32).sum(0)
        got = simulate(gpu, x, 32, time_chunk=[16, 16], amp=amp).sum(0)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(got).all()
    assert dtypes == {torch.float32}  # membranes and running sums, carried between the two chunks
    assert relative(got, want) < 0.05  # measured on the CPU under bfloat16: 0.006


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')
def test_nccl_with_two_processes_equals_one_process(tmp_path):
    """Two processes on two GPUs, each evaluating half of the batches: the NCCL-reduced accuracies
    and firing rates equal one process evaluating all of them."""
    script = tmp_path / 'nccl_two.py'
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(textwrap.dedent(f'''
        import sys, json
        sys.path[:0] = [{root!r}, {os.path.join(root, 'tests')!r}]
        import torch, torch.distributed as dist
        import trans_utils
        from engine_for_finetuning import evaluate_snn
        from test_multistep import converted_family
        from test_models import images
        rank = int(sys.argv[1])
        device = torch.device('cuda', rank)
        model = converted_family('vit_cls_token')
        data = [(images(4, seed=s), torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(s)))
                for s in range(4)]
        if rank < 0:  # one process, all batches
            device = torch.device('cuda', 0)
            model = trans_utils.set_backend(model.to(device), 'triton')
            monitor = trans_utils.SOPMonitor(model)
            out = evaluate_snn(model, data, device, 4, monitor=monitor, show_progress=False)
        else:
            dist.init_process_group('nccl', init_method='file://{tmp_path / "rendezvous"}', rank=rank,
                                    world_size=2, device_id=device)
            def nccl_sum(t):
                out = t.detach().clone()
                dist.all_reduce(out)
                return out
            model = trans_utils.set_backend(model.to(device), 'triton')
            monitor = trans_utils.SOPMonitor(model)
            out = evaluate_snn(model, data[rank::2], device, 4, monitor=monitor, reduce=nccl_sum,
                               show_progress=False)
            dist.destroy_process_group()
        print(json.dumps({{k: out[k] for k in ('acc1', 'n', 'fire_rate')}}))
    '''))
    runs = [subprocess.Popen([sys.executable, str(script), str(rank)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    alone = subprocess.run([sys.executable, str(script), '-1'], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    import json
    reduced = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    single = json.loads(alone.stdout.strip().splitlines()[-1])
    assert reduced[0] == reduced[1]  # every process holds the reduced figures
    assert reduced[0]['n'] == single['n'] == 16
    assert reduced[0]['acc1'] == pytest.approx(single['acc1'], abs=1e-9)
    assert reduced[0]['fire_rate'] == pytest.approx(single['fire_rate'], rel=1e-9)
