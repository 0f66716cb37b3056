"""The CUDA path: the same modules on a GPU (``torch.compile`` neuron, eager EC and products), held
to the CPU path. Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them
(python -m pytest -m cuda tests/test_cuda.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import model_vit
from engine_for_finetuning import simulate
from test_models import build, calibrate, images
from trans_utils import StatefulModule, TwoSideNeuron, convert_to_snn, set_backend

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


def converted_pair(config, levels=8):
    """(CPU model, the same model converted again for CUDA), thresholds calibrated on the CPU."""
    cpu, _ = build(config)
    calibrate(cpu)
    convert_to_snn(cpu, linear_num=levels, qkv_num=levels, softmax_num=levels,
                   fc2_thresholds=model_vit.default_fc2_thresholds(cpu))
    import copy
    gpu = set_backend(copy.deepcopy(cpu).cuda())
    return cpu, gpu


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('config', ['vit_cls_token', 'eva_giant', 'vit_layerscale_qknorm'])
def test_cuda_per_step_logits_match_the_cpu_path(config):
    cpu, gpu = converted_pair(config)
    backends = {m.kind: m.backend for m in gpu.modules() if isinstance(m, StatefulModule)}
    assert backends['neuron'] == 'compiled' and 'native' not in backends.values(), backends
    x = images(4)
    with torch.no_grad():
        want = simulate(cpu, x, T)
        chunked = {sizes: simulate(gpu, x.cuda(), T, time_chunk=list(sizes)).cpu()
                   for sizes in ((8,), (1,) * 8, (3, 5))}
        set_backend(gpu, 'eager')
        eager = simulate(gpu, x.cuda(), T).cpu()
    # CUDA's matrix products round differently from the CPU's (and with the batch count), which
    # may move a membrane across a threshold edge now and then: tolerances, not equality. On the
    # CPU the backends agree to 3e-7-8e-7 relative (tests/test_multistep.py).
    for sizes, got in chunked.items():
        assert got.shape == (T, 4, 10)
        assert relative(got, want) < 1e-3, sizes
        assert relative(got, chunked[(1,) * 8]) < 1e-3, sizes
    assert relative(eager, chunked[(8,)]) < 1e-3


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
def test_cuda_autocast_keeps_float32_state(amp):
    cpu, gpu = converted_pair('vit_layerscale_qknorm', levels=16)
    x = images(4)
    dtypes = set()

    def record(module, inputs, output):
        if module.keep_state:  # after the first chunk: the state carried to the next one
            dtypes.update(t.dtype for t in (module._membrane,) if t is not None)
    for m in gpu.modules():
        if isinstance(m, TwoSideNeuron):
            m.register_forward_hook(record)
    with torch.no_grad():
        want = simulate(cpu, x, 16).sum(0)
        got = simulate(gpu, x.cuda(), 16, time_chunk=[8, 8], amp=amp).sum(0).cpu()
    assert torch.isfinite(got).all() and dtypes == {torch.float32}
    assert relative(got, want) < 0.05  # measured on the CPU under bfloat16: 0.006


def test_nccl_with_one_process(tmp_path):
    """A one-process NCCL group: the calibration's and the monitor's reductions and evaluate_snn's
    go through NCCL and give what the process alone gives."""
    script = tmp_path / 'nccl_one.py'
    script.write_text(textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}, {os.path.dirname(os.path.abspath(__file__))!r}]
        import torch, torch.distributed as dist
        import model_vit, trans_utils
        from engine_for_finetuning import evaluate_snn
        from test_models import build, images
        dist.init_process_group('nccl', init_method='file://{tmp_path / "rendezvous"}', rank=0, world_size=1,
                                device_id=torch.device('cuda', 0))

        def nccl_sum(t):
            out = t.detach().clone()
            dist.all_reduce(out)
            return out

        model, _ = build('vit_cls_token')
        model = model.cuda()
        trans_utils.replace_test_by_testneuron(model)
        with torch.no_grad():
            model(torch.randn(8, 3, 16, 16, device='cuda'))
        assert trans_utils.sync_calibration(model, nccl_sum) == 1
        trans_utils.convert_to_snn(model, fc2_thresholds=model_vit.default_fc2_thresholds(model))
        data = [(images(4, seed=s), torch.randint(0, 10, (4,))) for s in range(2)]
        monitor = trans_utils.SOPMonitor(model)
        alone = evaluate_snn(model, data, torch.device('cuda'), 4, monitor=monitor, show_progress=False)
        monitor.remove()  # its counts stay readable
        reduced = evaluate_snn(model, data, torch.device('cuda'), 4, reduce=nccl_sum, show_progress=False)
        assert alone['acc1'] == reduced['acc1'] and alone['n'] == reduced['n'] == 8
        assert monitor.summary(reduce=nccl_sum) == monitor.summary()
        dist.destroy_process_group()
        print('nccl ok')
    '''))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and 'nccl ok' in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
