"""Threshold calibration (ECMT_SPEC 3): exact order statistics, running mean over batches."""
import functools

import pytest
import torch

import calibration
import trans_utils
from reference import ref_quantiles
from trans_utils import tail_quantiles

pytestmark = pytest.mark.usefixtures('single_thread')

PERCENTS = [0.99, 0.999, 0.9, 0.5, 1.0]


@pytest.fixture(params=['native', 'numpy', 'torch'])
def selection(request, monkeypatch):
    """Every implementation of the large-tensor path: the native kernel (the CPU default), numpy
    (its fallback) and torch's kernels (what other devices run)."""
    import kernels.native as native_kernels
    monkeypatch.setattr(calibration, '_CPU_SELECTION', request.param)
    if request.param == 'native':
        monkeypatch.setattr(native_kernels, 'ENABLED', True)
        assert native_kernels.library() is not None, 'the native kernels failed to build or load'
    return request.param


def assert_exact(x, percent):
    got_hi, got_lo = tail_quantiles(x, percent)
    want_hi, want_lo = ref_quantiles(x, percent)
    assert got_hi.dtype == torch.float32 and got_hi.dim() == 0
    assert torch.equal(got_hi, want_hi), f'upper: got {got_hi}, want {want_hi}'
    assert torch.equal(got_lo, want_lo), f'lower: got {got_lo}, want {want_lo}'
    return got_hi, got_lo


@pytest.mark.parametrize('n', [1, 2, 3, 10, 99, 100, 101, 1000, 4097])
@pytest.mark.parametrize('percent', PERCENTS)
def test_small_tensors(n, percent):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    hi, lo = assert_exact(x, percent)
    if int((1 - percent) * n) == 0:  # k rounds to 0: the minimum, as the 1-based clamp says
        assert lo == x.min()
    if n == 1:
        assert hi == lo == x[0]


def distributions(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        'normal': torch.randn(n, generator=g),
        'heavy_tailed': torch.randn(n, generator=g) / torch.randn(n, generator=g),  # Cauchy
        'ties': torch.randint(-3, 4, (n,), generator=g).float(),
        'constant': torch.full((n,), 2.5),
        'relu_like': torch.relu(torch.randn(n, generator=g)),  # half exact zeros
        'softmax_like': torch.softmax(torch.randn(n // 64, 64, generator=g) * 3, -1).reshape(-1),
    }


@pytest.mark.parametrize('n', [5000, (1 << 16) + 1, 300_001])
@pytest.mark.parametrize('kind', ['normal', 'heavy_tailed', 'ties', 'constant', 'relu_like', 'softmax_like'])
def test_distributions(n, kind, selection):
    x = distributions(n)[kind]
    for percent in PERCENTS:
        assert_exact(x, percent)


def test_batch_shaped_and_low_precision_input(selection):
    x = torch.randn(4, 3, 50, 64)
    assert_exact(x, 0.99)
    xb = x.to(torch.bfloat16)
    hi, lo = tail_quantiles(xb, 0.99)
    want_hi, want_lo = ref_quantiles(xb.float(), 0.99)
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)


class KthvalueSpy:
    """Record the sizes of the sets the large-tensor path selects from (to see which path ran):
    the selections of the numpy and torch paths, what the native kernel reports it gathered
    (the whole tensor when it fell back to the full selection)."""

    def __init__(self, monkeypatch):
        import kernels.native as native_kernels
        self.sizes = []
        original = calibration._kth_smallest

        def spy(values, k):
            self.sizes.append(len(values))
            return original(values, k)
        monkeypatch.setattr(calibration, '_kth_smallest', spy)
        native = native_kernels.tail_quantiles

        def native_spy(x, *args):
            q_hi, q_lo, (upper, lower, full) = native(x, *args)
            self.sizes += [x.numel()] if full else [upper, lower]
            return q_hi, q_lo, (upper, lower, full)
        monkeypatch.setattr(native_kernels, 'tail_quantiles', native_spy)


def sample_positions(n):
    """The flat indices whose values the large-tensor path samples to place its bounds (an
    implementation detail, needed here to build inputs that defeat the sample on purpose)."""
    if hasattr(calibration, '_sample_indices'):  # a fixed pseudo-random sample
        return calibration._sample_indices(n, torch.device('cpu')).unique()
    return torch.arange(0, n, n // calibration._SAMPLE_SIZE)  # a strided sample


@functools.lru_cache(maxsize=1)
def adversarial_layouts(n):
    """Layouts that defeat the sample of the large-tensor path, and plain orderings."""
    on_sample = torch.zeros(n, dtype=torch.bool)
    on_sample[sample_positions(n)] = True
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g)
    tails_on_sample = base.clone()  # the sample sees only huge values: its bounds are too high
    tails_on_sample[on_sample] = 1e3 + torch.rand(int(on_sample.sum()), generator=g)
    low_tail_on_sample = base.clone()
    low_tail_on_sample[on_sample] = -1e3 - torch.rand(int(on_sample.sum()), generator=g)
    tails_off_sample = torch.zeros(n)  # the sample sees only zeros, the tails are elsewhere
    tails_off_sample[~on_sample] = torch.randn(int((~on_sample).sum()), generator=g) * 10
    sample_constant = base.clone()  # a constant sample: no interval between the bounds
    sample_constant[on_sample] = 0.0
    rows = torch.zeros(n // 1000, 1000)  # each tail lives in three contiguous rows
    rows[7:10] = torch.randn(3, 1000, generator=g).abs() * 100 + 1
    rows[100:103] = -torch.randn(3, 1000, generator=g).abs() * 100 - 1
    return {
        'sorted': torch.sort(base).values,
        'reverse_sorted': torch.sort(base, descending=True).values,
        'tails_on_sample': tails_on_sample,
        'low_tail_on_sample': low_tail_on_sample,
        'tails_off_sample': tails_off_sample,
        'sample_constant': sample_constant,
        'tails_in_a_few_rows': rows,
    }


@pytest.mark.parametrize('layout', ['sorted', 'reverse_sorted', 'tails_on_sample', 'low_tail_on_sample',
                                    'tails_off_sample', 'sample_constant', 'tails_in_a_few_rows'])
def test_adversarial_layouts_stay_exact(monkeypatch, layout, selection):
    n = (1 << 18) + 7
    x = adversarial_layouts(n)[layout]
    spy = KthvalueSpy(monkeypatch)
    for percent in (0.99, 0.9):
        assert_exact(x, percent)
    if layout in ('tails_on_sample', 'low_tail_on_sample', 'sample_constant'):
        # The sample's bounds are wrong here: the exact answer needs the full selection.
        assert x.numel() in spy.sizes, 'expected the fallback to a full selection'
    if layout in ('sorted', 'reverse_sorted'):
        assert x.numel() not in spy.sizes, 'a benign layout should not need the full selection'


def test_more_than_2_pow_24_elements():
    """The original's torch.quantile refused this size (ECMT_SPEC 3); the calibration must not."""
    n = (1 << 24) + 3
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    hi, lo = tail_quantiles(x, 0.99)
    assert torch.equal(hi, torch.kthvalue(x, int(0.99 * n)).values)
    assert torch.equal(lo, torch.kthvalue(x, int((1 - 0.99) * n)).values)
    assert 2.2 < hi < 2.45 and -2.45 < lo < -2.2


@pytest.mark.parametrize('percent', [0.0, -0.1, 1.5, float('nan')])
def test_percent_out_of_range_raises(percent):
    with pytest.raises(ValueError):
        trans_utils.TestNeuron('fc1', percent=percent)
    with pytest.raises(ValueError):
        tail_quantiles(torch.randn(10), percent)


def test_empty_tensor_raises():
    with pytest.raises(ValueError):
        tail_quantiles(torch.empty(0), 0.99)


def test_running_mean_weighs_each_batch_equally():
    neuron = trans_utils.TestNeuron('fc1', percent=0.99)
    g = torch.Generator().manual_seed(6)
    # Batches of very different sizes and scales: a size-weighted mean would differ.
    batches = [torch.randn(8, 1000, generator=g), torch.randn(1, 30, generator=g) * 10,
               torch.randn(3, 200, generator=g) + 4, torch.randn(70_000, generator=g) * 0.1]
    highs, lows = [], []
    for x in batches:
        out = neuron(x)
        assert out is x  # calibration is an identity on the forward pass
        hi, lo = ref_quantiles(x, 0.99)
        highs.append(hi.double().item())
        lows.append(lo.double().item())
        want_p = torch.tensor([sum(highs) / len(highs)], dtype=torch.float32)
        want_n = torch.tensor([-sum(lows) / len(lows)], dtype=torch.float32)
        assert torch.equal(neuron.scale_p, want_p) and torch.equal(neuron.scale_n, want_n)
    assert neuron.num_batches == len(batches)
    assert neuron.scale_p.shape == (1,) and neuron.scale_n.shape == (1,)
    state = neuron.state_dict()
    assert set(state) == {'scale_p', 'scale_n'}  # the thresholds travel with the weights


def test_softmax_place_is_not_calibrated():
    neuron = trans_utils.TestNeuron('s', percent=0.99)
    x = torch.softmax(torch.randn(4, 10, 10), -1)
    assert neuron(x) is x
    assert neuron.scale_p.item() == 0 and neuron.scale_n.item() == 0 and neuron.num_batches == 0


def test_replace_test_by_testneuron_passes_percent():
    model = torch.nn.Sequential(trans_utils.MyTestPlace('fc1'), torch.nn.Linear(4, 4),
                                trans_utils.MyTestPlace('s'))
    trans_utils.replace_test_by_testneuron(model, percent=0.9)
    assert type(model[0]) is trans_utils.TestNeuron and model[0].percent == 0.9 and model[0].place == 'fc1'
    assert type(model[2]) is trans_utils.TestNeuron and model[2].place == 's'
    x = torch.randn(50, 4)
    model(x)
    assert model[0].scale_p.item() == ref_quantiles(x, 0.9)[0].item()
    with pytest.raises(ValueError):
        trans_utils.replace_test_by_testneuron(
            torch.nn.Sequential(trans_utils.MyTestPlace('fc1')), percent=1.5)


def strided_layouts():
    g = torch.Generator().manual_seed(12)
    base = torch.randn(6, 40, 70, 9, generator=g)  # 151,200 elements: the large-tensor path
    return {
        'permuted': base.permute(2, 0, 3, 1),  # q/k/v-style views
        'every_second_inner': torch.randn(6, 40, 70, 18, generator=g)[..., ::2],  # inner stride 2
        'transposed_last': base.transpose(-1, -2),
        'sliced_with_offset': torch.randn(8, 45, 70, 9, generator=g)[1:7, 5:],
        'expanded': torch.randn(1, 40, 70, 1, generator=g).expand(6, 40, 70, 9),  # stride 0
        'channels_last': base.contiguous(memory_format=torch.channels_last),
        'size_one_dims': base.reshape(6, 1, 40, 1, 70, 9).transpose(1, 3),
    }


@pytest.mark.parametrize('layout', list(strided_layouts()))
def test_any_strides_are_exact(layout, selection):
    x = strided_layouts()[layout]
    assert x.numel() > calibration._DIRECT_SELECT_MAX
    for percent in (0.99, 0.9, 1.0):
        assert_exact(x, percent)


@pytest.mark.parametrize('n', [100, 300_001])
@pytest.mark.parametrize('where', ['anywhere', 'on_the_sample'])
def test_a_nan_gives_nan_statistics(n, where, selection):
    """NaN has no place in an order: a tensor holding one has no quantiles (both NaN), whatever
    the path, instead of a number that silently depends on where NaN sorts."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    position = n // 3 if where == 'anywhere' or n <= calibration._DIRECT_SELECT_MAX else int(sample_positions(n)[0])
    x[position] = float('nan')
    hi, lo = tail_quantiles(x, 0.99)
    assert hi.isnan() and lo.isnan() and hi.dtype == torch.float32
