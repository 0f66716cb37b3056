"""Where the SNN's floor lies, in one process (a benchmark, not a test): T x ANN, the ANN on T*B rows, the SNN,
and a memory floor of the neurons
(one clone of each neuron call's input: read it, write as many floats, nothing else).

    python benchmarks/bench_floor.py vit_tiny_patch16_224 "patch_size=4 embed_dim=96 depth=4 num_heads=3" 32 64 8 5

Arguments: model, model kwargs (one string), input size, batch, T, rounds (median). Random weights."""
import sys, time, copy, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import utils, native_kernels
from model_vit import create_model
from engine_for_finetuning import simulate
from trans_utils import convert_to_snn, fuse_ec_neurons, replace_test_by_testneuron, TwoSideNeuron, get_modules

name, kw, size, B, T, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
utils.keep_freed_memory(); native_kernels.prepare()
torch.manual_seed(0)
kwargs = utils.parse_model_kwargs(kw.split()) if kw else {}
model = create_model(name, img_size=size, num_classes=10 if size == 32 else 1000, **kwargs).eval()
images = torch.randn(B, 3, size, size)
calib = copy.deepcopy(model); replace_test_by_testneuron(calib, 0.99)
with torch.no_grad():
    calib(images)
    snn = copy.deepcopy(calib); convert_to_snn(snn, fc2_thresholds=(0.25, 0.08)); fuse_ec_neurons(snn, True)
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.append(a[0].numel())) for _, m in get_modules(snn, (TwoSideNeuron,))]
    simulate(snn, images, T)
    for h in hooks: h.remove()
    bufs = [torch.randn(n) for n in sizes]
    rows = images.repeat(T, 1, 1, 1)
    def t(fn):
        s = time.perf_counter(); fn(); return time.perf_counter() - s
    res = {'Tann': [], 'annTB': [], 'snn': [], 'floor': []}
    for r in range(rounds + 1):
        a = t(lambda: [model(images) for _ in range(T)])
        b = t(lambda: model(rows))
        c = t(lambda: simulate(snn, images, T))
        d = t(lambda: [x.clone() for x in bufs])
        if r:
            for k, v in zip(res, (a, b, c, d)): res[k].append(v)
    m = {k: statistics.median(v) for k, v in res.items()}
    print(f'{name} {kw} B={B} T={T}: neuron calls {len(sizes)}, {sum(sizes)/1e6:.1f} M elements')
    print('  ' + ', '.join(f'{k} {1000*v:.1f} ms' for k, v in m.items()))
    print(f"  SNN/(T ANN) {m['snn']/m['Tann']:.3f}; ANN on T*B rows/(T ANN) {m['annTB']/m['Tann']:.3f}; "
          f"(ANN T*B + neuron copy floor)/(T ANN) {(m['annTB'] + m['floor'])/m['Tann']:.3f}")
