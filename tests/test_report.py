"""Reports and figures of an snn run: the per-layer CSV, the level counts, the PNG figures, and
the CLI switches that write them (--monitor, --level_batches, --plot, --ann_results)."""
import csv
import json
import sys
from pathlib import Path

import pytest

import report
import run_class_finetuning as cli
from report import LAYER_COLUMNS, level_report, plot_results, write_layer_report, write_level_counts
from helpers import run, snn_images as images, tiny_snn
from trans_utils import SOPMonitor, TwoSideNeuron
from utils import UserError

T = 3  # the steps helpers.run simulates by default

PIL = pytest.importorskip('PIL.Image')

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def counted():
    """A tiny converted model and a monitor (levels counted) that has run 2 batches of T steps."""
    import trans_utils
    previous = trans_utils.set_default_backend('eager')
    try:
        model = tiny_snn()
        monitor = SOPMonitor(model, count_levels=True)
        run(model, monitor, [images(3, seed=1), images(2, seed=2)])
        monitor.remove()
    finally:
        trans_utils.set_default_backend(previous)
    return model, monitor


def no_temporary_files(folder):
    return not [p for p in Path(folder).iterdir() if p.name.startswith('.')]


# ------------------------------------------------------------------------- per-layer report
def test_layer_csv_has_one_row_per_layer_and_step(tmp_path, counted):
    _, monitor = counted
    path = tmp_path / 'tiny_layers.csv'
    records = write_layer_report(monitor, path)
    with open(path, newline='') as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == LAYER_COLUMNS
        rows = list(reader)
    assert len(rows) == len(monitor.names) * T == len(records)
    keys = [(r['layer'], int(r['step'])) for r in rows]
    assert len(set(keys)) == len(keys)
    assert set(keys) == {(name, t) for name in monitor.names for t in range(1, T + 1)}
    sops, dense = monitor.totals()
    for row in rows:
        i, t = monitor.names.index(row['layer']), int(row['step']) - 1
        assert row['kind'] == monitor.kinds[i]
        assert float(row['sops']) == float(sops[i, t]) and float(row['dense']) == float(dense[i, t])
        assert float(row['fire_rate']) == pytest.approx(float(sops[i, t] / dense[i, t]), rel=1e-5)
    assert no_temporary_files(tmp_path)


def test_layer_report_as_json(tmp_path, counted):
    _, monitor = counted
    records = write_layer_report(monitor, tmp_path / 'layers.json')
    assert json.loads((tmp_path / 'layers.json').read_text()) == records
    assert len(records) == len(monitor.names) * T and set(records[0]) == set(LAYER_COLUMNS)


def test_layer_rates_are_over_all_steps():
    records = [{'layer': 'a', 'kind': 'linear', 'step': 1, 'sops': 1.0, 'dense': 10.0, 'fire_rate': 0.1},
               {'layer': 'a', 'kind': 'linear', 'step': 2, 'sops': 5.0, 'dense': 10.0, 'fire_rate': 0.5},
               {'layer': 'b', 'kind': 'product', 'step': 1, 'sops': 0.0, 'dense': 4.0, 'fire_rate': 0.0},
               {'layer': 'b', 'kind': 'product', 'step': 2, 'sops': 2.0, 'dense': 4.0, 'fire_rate': 0.5}]
    rates = report.layer_rates(records)
    assert list(rates) == ['a', 'b']
    assert rates['a']['fire_rate'] == pytest.approx(0.3) and rates['b']['fire_rate'] == pytest.approx(0.25)
    assert rates['a']['steps'] == 2 and rates['b']['kind'] == 'product'


# ------------------------------------------------------------------------- level counts
def test_level_json_counts_every_neuron(tmp_path, counted):
    model, monitor = counted
    document = write_level_counts(monitor, tmp_path / 'levels.json')
    assert json.loads((tmp_path / 'levels.json').read_text()) == json.loads(json.dumps(document))
    neurons = [n for n, m in model.named_modules() if isinstance(m, TwoSideNeuron)]
    assert [n['neuron'] for n in document['neurons']] == neurons
    assert document['batches_counted'] == 2
    for n in document['neurons']:
        assert len(n['positive']) == len(n['negative']) == n['levels'] == 8
        assert n['spikes'] == sum(n['positive']) + sum(n['negative']) > 0
        assert n['unused_levels'] == [j for j in range(8) if n['positive'][j] + n['negative'][j] == 0]
    summary = document['summary']
    assert summary['neurons'] == len(neurons)
    assert set(summary['by_place']) == {'fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'fc2'}
    assert sum(p['spikes'] for p in summary['by_place'].values()) == sum(n['spikes'] for n in document['neurons'])
    assert summary['by_place']['s']['negative'] == [0] * 8  # softmax outputs are never negative


def test_level_report_names_the_unused_levels():
    document = level_report([
        {'neuron': 'a', 'place': 'fc1', 'levels': 3, 'positive': [5, 0, 0], 'negative': [1, 2, 0]},
        {'neuron': 'b', 'place': 'fc1', 'levels': 3, 'positive': [0, 0, 0], 'negative': [0, 0, 0]},
        {'neuron': 'c', 'place': 'q', 'levels': 2, 'positive': [1, 1], 'negative': [0, 0]},
    ], batches=1)
    assert [n['unused_levels'] for n in document['neurons']] == [[2], [0, 1, 2], []]
    summary = document['summary']
    assert summary['neurons_using_all_levels'] == 1 and summary['neurons_with_unused_levels'] == 2
    assert summary['silent_neurons'] == ['b']
    assert summary['by_place']['fc1'] == {'neurons': 2, 'levels': 3, 'positive': [5, 0, 0],
                                          'negative': [1, 2, 0], 'spikes': 8, 'unused_levels': [2]}
    line = report.level_summary_line(document)
    assert line.startswith('MT neurons: 1 of 3 fired at every level (spikes of 1 batch)')
    assert 'fc1 2' in line and 'q' not in line.split(';')[1]


def test_level_counts_need_a_counting_monitor(counted):
    model, _ = counted
    monitor = SOPMonitor(model)
    monitor.remove()
    with pytest.raises(ValueError, match='count_levels=True'):
        write_level_counts(monitor, 'unused.json')


# ------------------------------------------------------------------------- figures
RESULTS = {'T': 4, 'acc1': [20.0, 45.5, 60.0, 66.0], 'acc5': [50.0, 70.0, 80.0, 90.0],
           'fire_rate': [0.2, 0.25, 0.27, 0.28], 'energy_ratio': [0.04, 0.1, 0.16, 0.22]}


def assert_png(path):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0
    with PIL.open(path) as image:
        assert image.format == 'PNG' and image.size[0] > 100 and image.size[1] > 100
        image.load()


def test_plot_writes_three_readable_pngs(tmp_path, counted):
    _, monitor = counted
    paths = plot_results(RESULTS, tmp_path / 'figs', 'tiny', ann_acc1=70.0,
                         layer_records=monitor.layer_records())
    assert [p.name for p in paths] == ['tiny_accuracy.png', 'tiny_energy.png', 'tiny_layer_rates.png']
    for path in paths:
        assert_png(path)
    assert no_temporary_files(tmp_path / 'figs')


def test_plot_without_monitor_figures_draws_accuracy_only(tmp_path):
    paths = plot_results({'T': 2, 'acc1': [10.0, 12.0]}, tmp_path, 'bare')
    assert [p.name for p in paths] == ['bare_accuracy.png']
    assert_png(paths[0])


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(UserError, match=r'^--plot needs matplotlib: pip install matplotlib$'):
        plot_results(RESULTS, tmp_path, 'tiny')
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- the CLI
ARCH = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2',
        'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS',
        '--num_workers', '0', '--batch_size', '150', '--device', 'cpu', '--no_progress']


def cli_run(out, *extra):
    args = cli.get_args_parser().parse_args(ARCH + ['--log_dir', str(out), '--output_dir', str(out)] + list(extra))
    return cli.main(args)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A for_v checkpoint (random weights) and the results JSON of an ann run."""
    out = tmp_path_factory.mktemp('forv')
    record = cli_run(out, '--test_mode', 'for_v', '--savename', 'tiny_for_v')
    cli_run(out, '--test_mode', 'ann', '--model_path', record['checkpoint'], '--results', str(out / 'ann.json'))
    return Path(record['checkpoint']), out / 'ann.json'


def test_cli_snn_writes_reports_and_figures(tmp_path, checkpoint, capsys):
    path, ann = checkpoint
    record = cli_run(tmp_path, '--test_mode', 'snn', '--model_path', str(path), '--test_T', '2',
                     '--level_batches', '1', '--plot', '--ann_results', str(ann),
                     '--results', str(tmp_path / 'snn.json'))
    saved = json.loads((tmp_path / 'snn.json').read_text())
    assert saved == json.loads(json.dumps(record))
    assert len(saved['fire_rate']) == len(saved['energy_ratio']) == 2
    assert saved['ann_acc1'] == json.loads(ann.read_text())['acc1']
    # Default report name: the checkpoint's stem + _snn.
    names = {p.name for p in tmp_path.iterdir()}
    assert {'tiny_for_v_snn_layers.csv', 'tiny_for_v_snn_levels.json', 'tiny_for_v_snn_accuracy.png',
            'tiny_for_v_snn_energy.png', 'tiny_for_v_snn_layer_rates.png', 'tiny_for_v_snn_energy_split.png'} <= names
    assert saved['layer_report'] == str(tmp_path / 'tiny_for_v_snn_layers.csv')
    assert saved['level_counts'] == str(tmp_path / 'tiny_for_v_snn_levels.json')
    assert [Path(p).name for p in saved['figures']] == ['tiny_for_v_snn_accuracy.png', 'tiny_for_v_snn_energy.png',
                                                        'tiny_for_v_snn_layer_rates.png',
                                                        'tiny_for_v_snn_energy_split.png']
    for figure in saved['figures']:
        assert_png(figure)
    with open(tmp_path / 'tiny_for_v_snn_layers.csv', newline='') as fh:
        rows = list(csv.DictReader(fh))
    # The SOP monitor's layers (with SOPs), then the energy report's other modules (without).
    assert len([r for r in rows if r['sops'] != '']) == (2 * 6 + 1) * 2
    assert {r['kind'] for r in rows if r['sops'] == ''} == {'conv', 'neuron', 'ec_layer_norm', 'ec_softmax', 'ec_gelu'}
    levels = json.loads((tmp_path / 'tiny_for_v_snn_levels.json').read_text())
    assert levels['batches_counted'] == 1 and levels['summary']['neurons'] == 16
    console, log = capsys.readouterr().out, (tmp_path / 'log_snn.txt').read_text()
    for text in (console, log):
        assert 'firing rate' in text and 'energy vs ANN' in text
        assert 'per-layer SOPs and firing rates (13 layers x 2 steps)' in text
        assert 'MT neurons:' in text and 'fired at every level (spikes of 1 batch)' in text
        assert 'figures: ' in text


def test_cli_snn_monitor_on_without_levels_or_plot(tmp_path, checkpoint):
    path, _ = checkpoint
    record = cli_run(tmp_path, '--test_mode', 'snn', '--model_path', str(path), '--test_T', '1',
                     '--savename', 'custom')
    assert {p.name for p in tmp_path.iterdir()} == {'custom_layers.csv', 'log_snn.txt'}
    assert 'level_counts' not in record and 'figures' not in record


def test_cli_snn_without_monitor_plots_accuracy_only(tmp_path, checkpoint):
    path, _ = checkpoint
    record = cli_run(tmp_path, '--test_mode', 'snn', '--model_path', str(path), '--test_T', '1',
                     '--no-monitor', '--plot', '--savename', 'plain')
    assert [Path(p).name for p in record['figures']] == ['plain_accuracy.png']
    assert 'layer_report' not in record and not (tmp_path / 'plain_layers.csv').exists()


def test_cli_plot_without_matplotlib_fails_before_the_run(tmp_path, checkpoint, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(UserError, match='--plot needs matplotlib: pip install matplotlib'):
        cli_run(tmp_path, '--test_mode', 'snn', '--model_path', str(path), '--test_T', '1', '--plot')
    assert not (tmp_path / 'log_snn.txt').exists()


def test_cli_bad_ann_results(tmp_path, checkpoint):
    path, _ = checkpoint
    common = ['--test_mode', 'snn', '--model_path', str(path), '--test_T', '1', '--plot']
    with pytest.raises(UserError, match='no such file'):
        cli_run(tmp_path, *common, '--ann_results', str(tmp_path / 'missing.json'))
    (tmp_path / 'snn.json').write_text(json.dumps({'test_mode': 'snn', 'acc1': [1.0, 2.0]}))
    with pytest.raises(UserError, match="'snn' run, not of an ann run"):
        cli_run(tmp_path, *common, '--ann_results', str(tmp_path / 'snn.json'))
    (tmp_path / 'junk.json').write_text('{not json')
    with pytest.raises(UserError, match='not a readable JSON'):
        cli_run(tmp_path, *common, '--ann_results', str(tmp_path / 'junk.json'))


def test_cli_level_batches_values():
    parse = cli.get_args_parser().parse_args
    assert parse(['--level_batches', 'all']).level_batches is None
    assert parse(['--level_batches', '3']).level_batches == 3
    assert parse([]).level_batches == 0
    for bad in ('-1', 'some'):
        with pytest.raises(SystemExit):
            parse(['--level_batches', bad])
