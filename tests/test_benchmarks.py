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
