"""Smoke tests of the benchmark scripts that compare code trees (they are run by hand, so a
change elsewhere could break them unnoticed)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ab_trees_compares_a_checkout_with_itself(tmp_path):
    """benchmarks/ab_trees.py imports two checkouts apart (here the same one twice, under two
    paths) and times them interleaved: the same logits, every figure present."""
    other = tmp_path / 'copy'
    other.mkdir()
    for path in ROOT.glob('*.py'):
        (other / path.name).write_text(path.read_text())
    (other / 'kernels').mkdir()  # the kernels package: its modules, and the C++ source they build
    for path in (ROOT / 'kernels').glob('*.py'):
        (other / 'kernels' / path.name).write_text(path.read_text())
    (other / 'kernels' / 'csrc').symlink_to(ROOT / 'kernels' / 'csrc')
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'ab_trees.py'), '--before', str(other),
                           '--model', 'vit_tiny_patch16_224', '--input_size', '16', '--model_kwargs', 'patch_size=4',
                           'embed_dim=32', 'depth=1', 'num_heads=2', '--batch_size', '2', '--T', '2', '--rounds', '1',
                           '--json'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out['before_root'] == str(other.resolve()) and out['after_root'] == str(ROOT)
    assert out['logits_max_abs_diff'] == 0.0
    for name in ('before', 'after'):
        assert out[name]['snn_cpu'] > 0 and out[name]['ann_cpu'] > 0 and out[name]['snn_over_T_ann_cpu'] > 0
    assert out['after_over_before_snn_cpu'] > 0


def test_low_latency_benchmark_rows_and_the_scale_sweep(tmp_path):
    """benchmarks/low_latency.py on a tiny random model: every option x coding gives its published
    row, one row per --bench_scales scale and one per target; the sweep's scale 1 is the published
    conversion itself (the same figures), another scale changes the spikes."""
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2)
    weights = tmp_path / 'tiny.pth'
    torch.save({'model': model.state_dict()}, weights)
    out = tmp_path / 'bench'
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'low_latency.py'), '--model',
                           'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=1',
                           'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS',
                           '--calib_data_path', 'train', '--calib_batches', '1', '--num_workers', '0',
                           '--batch_size', '150', '--device', 'cpu', '--no_progress', '--model_path', str(weights),
                           '--bench_T', '2', '--bench_options', 'published', 'round', '--coding', 'differential',
                           '--bench_targets', '1', '--search_budget', '8', '--search_images', '32',
                           '--bench_scales', '1', '0.25', '--bench_out', str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / 'low_latency.json').read_text())['rows']
    assert [(r['options'], r['calibration']) for r in rows] == [
        (option, name) for option in ('published', 'round') for name in (
            f'{option}, published (percent 0.99)', f'{option}, threshold_scale 1', f'{option}, threshold_scale 0.25',
            f'{option}, --target_T 1')]
    for first in (0, 4):
        published, same, lower = rows[first], rows[first + 1], rows[first + 2]
        assert same['acc1'] == published['acc1'] and same['energy_ratio'] == published['energy_ratio']
        assert lower['energy_ratio'] != published['energy_ratio']
    assert (out / 'low_latency.md').read_text().count('threshold_scale 0.25') == 2
