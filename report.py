"""Reports and figures from the results of an SNN run (ECMT_SPEC 8): the per-layer energy table,
the MT neurons' spikes per level, and PNG figures of accuracy, energy and firing rate.

* :func:`write_layer_report` ``<savename>_layers.csv``: one row per monitored layer and time step
  (with an energy report, :mod:`energy`, also its classes in pJ per image, and rows for the
  neurons, EC modules and convolutions it counts);
* :func:`write_level_counts` ``<savename>_levels.json``: spikes per level of every MT neuron, and
  which levels are never used (top levels that never fire mean a smaller N would do);
* :func:`plot_results` ``<prefix>_accuracy.png``, ``<prefix>_energy.png``,
  ``<prefix>_layer_rates.png``, and with an energy report ``<prefix>_energy_split.png``.

Every file is written atomically (a temporary file renamed over the target). matplotlib is
needed for the figures only, and drawn with its Agg canvas (no display, no pyplot state).
"""
from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import utils
from utils import UserError

__all__ = ['LAYER_COLUMNS', 'ENERGY_COLUMNS', 'energy_lines', 'write_layer_report', 'write_layer_records', 'level_report',
           'write_level_counts', 'level_summary_line', 'layer_rates', 'read_ann_accuracy',
           'require_matplotlib', 'plot_results', 'write_snn_reports']

#: Columns of the per-layer report, in order.
LAYER_COLUMNS = ('layer', 'kind', 'step', 'sops', 'dense', 'fire_rate')
#: Columns an energy report adds (pJ per image of that layer and step; energy.CLASSES).
ENERGY_COLUMNS = ('synaptic', 'mac', 'nonlinear', 'neuron', 'memory')

MATPLOTLIB_MISSING = '--plot needs matplotlib: pip install matplotlib'


def _write_text(text: str, path) -> None:
    utils._atomic_write(path, lambda fh: fh.write(text), 'w')


def write_layer_report(monitor, path, reduce: Optional[Callable] = None) -> List[Dict]:
    """Write the SOPs, dense operations and firing rate of every monitored layer at every step
    (``monitor`` a :class:`trans_utils.SOPMonitor` that has counted; ``reduce`` sums over
    processes). See :func:`write_layer_records`. Returns the records."""
    return write_layer_records(monitor.layer_records(reduce), path)


def write_layer_records(records: Sequence[Dict], path, energy=None) -> List[Dict]:
    """Write :meth:`SOPMonitor.layer_records`: a ``.json`` path gets a JSON list, anything else
    CSV with :data:`LAYER_COLUMNS`, one row per layer and step. ``step`` is 1-based and each row
    covers that step alone (not steps 1..t). With ``energy`` (an :class:`energy.EnergyReport`)
    every row also gets :data:`ENERGY_COLUMNS`, that layer's and step's energy by class in pJ per
    image, and the modules it counts that the SOP monitor does not (neurons, EC modules,
    convolutions) get rows of their own after those, with empty SOP columns. Returns the records."""
    records = [dict(r) for r in records]
    columns = LAYER_COLUMNS
    if energy is not None:
        columns = LAYER_COLUMNS + ENERGY_COLUMNS
        by_layer = energy.layer_records()
        zero = {c: 0.0 for c in ENERGY_COLUMNS}
        for record in records:
            record.update(by_layer.get((record['layer'], record['step']), zero))
        counted = {r['layer'] for r in records}
        kinds = dict(zip(energy.names, energy.kinds))
        for (layer, step), classes in by_layer.items():
            if layer not in counted:
                records.append({'layer': layer, 'kind': kinds[layer], 'step': step, 'sops': None,
                                'dense': None, 'fire_rate': None, **classes})
    path = Path(path)
    if path.suffix.lower() == '.json':
        utils.write_json(records, path)
        return records
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    for record in records:
        row = {**record}
        for key, form in (('sops', '.0f'), ('dense', '.0f'), ('fire_rate', '.6g')):
            row[key] = '' if record[key] is None else format(record[key], form)
        for key in columns[len(LAYER_COLUMNS):]:
            row[key] = f'{record[key]:.6g}'
        writer.writerow(row)
    _write_text(buffer.getvalue(), path)
    return records


def level_report(neurons: Sequence[Dict], batches: Optional[int] = None) -> Dict:
    """The level-count document: per neuron its counts and unused levels, and a summary by place.

    ``neurons`` are :meth:`SOPMonitor.level_counts` records (neuron, place, levels, positive,
    negative). A level is unused by a neuron when neither side fired at it; by a place when no
    neuron of that place fired at it.
    """
    per_neuron = []
    places: Dict[str, Dict] = OrderedDict()
    for record in neurons:
        positive, negative = list(record['positive']), list(record['negative'])
        unused = [j for j, (p, n) in enumerate(zip(positive, negative)) if p + n == 0]
        per_neuron.append({**record, 'spikes': sum(positive) + sum(negative), 'unused_levels': unused})
        place = places.setdefault(record['place'], {'neurons': 0, 'levels': record['levels'],
                                                    'positive': [0] * len(positive),
                                                    'negative': [0] * len(negative)})
        place['neurons'] += 1
        if len(positive) != len(place['positive']):  # same place, other N: keep the widest
            width = max(len(positive), len(place['positive']))
            for side in ('positive', 'negative'):
                place[side] += [0] * (width - len(place[side]))
            place['levels'] = width
        for side, counts in (('positive', positive), ('negative', negative)):
            for j, c in enumerate(counts):
                place[side][j] += c
    for place in places.values():
        place['spikes'] = sum(place['positive']) + sum(place['negative'])
        place['unused_levels'] = [j for j, (p, n) in enumerate(zip(place['positive'], place['negative']))
                                  if p + n == 0]
    using_all = sum(1 for n in per_neuron if not n['unused_levels'])
    summary = {
        'neurons': len(per_neuron),
        'neurons_using_all_levels': using_all,
        'neurons_with_unused_levels': len(per_neuron) - using_all,
        'silent_neurons': [n['neuron'] for n in per_neuron if n['spikes'] == 0],
        'by_place': places,
    }
    document = {'batches_counted': batches, 'summary': summary, 'neurons': per_neuron}
    if batches is None:
        del document['batches_counted']
    return document


def write_level_counts(monitor, path, reduce: Optional[Callable] = None) -> Dict:
    """Write the spikes per level of every MT neuron as JSON (see :func:`level_report`).
    The monitor must have been made with ``count_levels=True``. Returns the document."""
    if not getattr(monitor, 'count_levels', True):
        raise ValueError('the monitor did not count levels: make it with '
                         'SOPMonitor(model, count_levels=True)')
    document = level_report(monitor.level_counts(reduce), getattr(monitor, 'level_batches_counted', None))
    utils.write_json(document, path)
    return document


def level_summary_line(document: Dict) -> str:
    """One English line on level use, for the log and the console."""
    summary = document['summary']
    line = f'MT neurons: {summary["neurons_using_all_levels"]} of {summary["neurons"]} fired at every level'
    batches = document.get('batches_counted')
    if batches is not None:
        line += f' (spikes of {batches} batch{"es" if batches != 1 else ""})'
    unused = [f'{place} {_ranges(info["unused_levels"])}' for place, info in summary['by_place'].items()
              if info['unused_levels']]
    if unused:
        line += '; levels no neuron of the place used: ' + ', '.join(unused)
    return line


def _ranges(levels: Sequence[int]) -> str:
    """[0, 3, 4, 5] -> '0,3-5'."""
    parts, start = [], None
    for i, j in enumerate(levels):
        if start is None:
            start = j
        if i + 1 == len(levels) or levels[i + 1] != j + 1:
            parts.append(str(start) if start == j else f'{start}-{j}')
            start = None
    return ','.join(parts)


def check_ann_results(path, model: str, data_set: str, images: int, classes=None) -> float:
    """``--ann_results``: the top-1 of an ann run's record, if that run evaluated the same model
    (``--model``), data set, number of images and classes (where the record names them: records
    of older versions have no ``classes``) as this snn run; else one UserError naming what
    differs, so that another model's accuracy is never drawn as this one's ANN."""
    acc1 = read_ann_accuracy(path)
    record = json.loads(Path(path).read_text())
    differences = []
    for key, ours in (('model', model), ('data_set', data_set), ('n', images)):
        theirs = record.get(key)
        if theirs is not None and ours is not None and theirs != ours:
            word = {'n': 'images', 'data_set': 'data set'}.get(key, key)
            differences.append(f'{word} {theirs} (this run: {ours})')
    theirs = record.get('classes')
    if isinstance(theirs, list) and classes is not None and list(theirs) != list(classes):
        differences.append(f'{len(theirs)} classes{" named otherwise" if len(theirs) == len(classes) else ""} '
                           f'(this run: {len(classes)})')
    if differences:
        raise UserError(f'--ann_results {path} is the ANN of another run: ' + ', '.join(differences)
                        + '; pass the --results of an ann run of this model on these images, or leave '
                        '--ann_results out')
    return acc1


def read_ann_accuracy(path) -> float:
    """Top-1 accuracy (percent) from the ``--results`` JSON of an ``ann`` run."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f'--ann_results: no such file: {path}') from None
    except (OSError, ValueError) as exc:
        raise UserError(f'--ann_results: {path} is not a readable JSON file ({exc})') from None
    if not isinstance(record, dict):
        raise UserError(f'--ann_results: {path} is not a results record (a JSON object)')
    if record.get('test_mode', 'ann') != 'ann':
        raise UserError(f'--ann_results: {path} is the record of a {record["test_mode"]!r} run, '
                        'not of an ann run')
    acc1 = record.get('acc1')
    if isinstance(acc1, bool) or not isinstance(acc1, (int, float)):
        raise UserError(f'--ann_results: {path} has no top-1 accuracy (a number under "acc1"); '
                        'pass the --results file of a --test_mode ann run')
    return float(acc1)


def require_matplotlib():
    """Import matplotlib's Agg canvas, or raise the one-line :class:`UserError` saying how to
    install it."""
    try:
        import matplotlib  # noqa: F401 - first, so that a blocked parent fails even if submodules are cached
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MATPLOTLIB_MISSING) from None
    return Figure, FigureCanvasAgg


def _save_png(figure, canvas_type, path: Path) -> None:
    canvas_type(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
    data = buffer.getvalue()
    utils._atomic_write(path, lambda fh: fh.write(data), 'wb')


def layer_rates(layer_records: Sequence[Dict]) -> Dict[str, Dict]:
    """Per layer (in monitor order): kind, last step T and its firing rate over steps 1..T
    (SOPs summed over the steps / dense operations summed the same way, as r_t)."""
    layers: Dict[str, Dict] = OrderedDict()
    for r in layer_records:
        layer = layers.setdefault(r['layer'], {'kind': r['kind'], 'steps': 0, 'sops': 0.0, 'dense': 0.0})
        layer['steps'] = max(layer['steps'], r['step'])
        layer['sops'] += r['sops']
        layer['dense'] += r['dense']
    for layer in layers.values():
        layer['fire_rate'] = layer['sops'] / layer['dense'] if layer['dense'] else 0.0
    return layers


def plot_results(results: Dict, output_dir, prefix: str, ann_acc1: Optional[float] = None,
                 layer_records: Optional[Sequence[Dict]] = None) -> List[Path]:
    """Draw the figures of an snn ``results`` dict (as ``evaluate_snn`` returns it) into
    ``output_dir`` and return their paths:

    * ``<prefix>_accuracy.png``: SNN top-1 against the time step, the ANN's top-1 as a horizontal
      line when ``ann_acc1`` is given;
    * ``<prefix>_energy.png``: energy relative to the ANN against the time step (needs
      ``energy_ratio`` in ``results``, i.e. the monitor on);
    * ``<prefix>_layer_rates.png``: firing rate of every monitored layer after the last step T,
      over steps 1..T as r_t is (needs ``layer_records``, :meth:`SOPMonitor.layer_records`);
    * ``<prefix>_energy_split.png``: the SNN's energy of steps 1..t per image, a bar per step
      stacked by class, the ANN's (and the quantised ANNs') under the same energy model as lines
      (needs ``energy`` in ``results``, :meth:`energy.EnergyReport.summary`).

    A figure whose data is missing is not drawn. Raises :class:`UserError` without matplotlib.
    """
    Figure, Canvas = require_matplotlib()
    output_dir = Path(output_dir)
    acc1 = list(results['acc1'])
    steps = list(range(1, len(acc1) + 1))
    paths = []

    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.plot(steps, acc1, marker='o', label='SNN')
    if ann_acc1 is not None:
        ax.axhline(ann_acc1, color='tab:red', linestyle='--', label=f'ANN ({ann_acc1:.2f}%)')
    ax.set_xlabel('time step t')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title(f'{prefix}: accuracy after t steps')
    ax.set_xticks(steps if len(steps) <= 16 else steps[::max(1, len(steps) // 16)])
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = output_dir / f'{prefix}_accuracy.png'
    _save_png(figure, Canvas, path)
    paths.append(path)

    if results.get('energy_ratio'):
        energy = list(results['energy_ratio'])
        figure = Figure(figsize=(6, 4))
        ax = figure.add_subplot()
        ax.plot(steps[:len(energy)], energy, marker='o', color='tab:green', label='SNN / ANN')
        ax.axhline(1.0, color='gray', linestyle=':', label='ANN')
        ax.set_xlabel('time step t')
        ax.set_ylabel('energy relative to the ANN')
        ax.set_title(f'{prefix}: E_t = t x (0.9/4.6) x firing rate')
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = output_dir / f'{prefix}_energy.png'
        _save_png(figure, Canvas, path)
        paths.append(path)

    if layer_records:
        layers = layer_rates(layer_records)
        last = max(layer['steps'] for layer in layers.values())
        figure = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2), 4.5))
        ax = figure.add_subplot()
        colors = ['tab:blue' if layer['kind'] == 'linear' else 'tab:orange' for layer in layers.values()]
        ax.bar(range(len(layers)), [layer['fire_rate'] for layer in layers.values()], color=colors)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(list(layers), rotation=90, fontsize=7)
        ax.set_ylabel('firing rate (SOPs / dense operations)')
        ax.set_title(f'{prefix}: firing rate per layer, steps 1..{last}\n'
                     '(blue: linear layers, orange: EC products)')
        ax.grid(True, axis='y', alpha=0.3)
        path = output_dir / f'{prefix}_layer_rates.png'
        _save_png(figure, Canvas, path)
        paths.append(path)

    if results.get('energy'):
        path = output_dir / f'{prefix}_energy_split.png'
        _plot_energy_split(results['energy'], prefix, path, Figure, Canvas)
        paths.append(path)
    return paths


_CLASS_COLORS = {'synaptic': 'tab:blue', 'mac': 'tab:red', 'nonlinear': 'tab:orange', 'neuron': 'tab:green',
                 'memory': 'tab:gray'}


def _plot_energy_split(energy: Dict, prefix: str, path: Path, Figure, Canvas) -> None:
    per_step = energy['per_step']
    classes = list(per_step[0])
    ann_total = sum(energy['ann'].values())
    peak = max(ann_total, sum(sum(step.values()) for step in per_step))
    scale, unit = next(((s, u) for s, u in ((1e6, 'µJ'), (1e3, 'nJ')) if peak >= 10 * s), (1.0, 'pJ'))
    steps = list(range(1, len(per_step) + 1))
    figure = Figure(figsize=(max(6.0, 0.5 * len(steps) + 3), 4.5))
    ax = figure.add_subplot()
    bottom = [0.0] * len(steps)
    for name in classes:
        cumulative, total = [], 0.0
        for step in per_step:
            total += step[name]
            cumulative.append(total / scale)
        if not any(cumulative):
            continue
        ax.bar(steps, cumulative, bottom=bottom, color=_CLASS_COLORS.get(name), label=f'SNN {name}')
        bottom = [b + c for b, c in zip(bottom, cumulative)]
    ax.axhline(ann_total / scale, color='black', linestyle='--', label=f'ANN ({ann_total / scale:.4g} {unit})')
    for quantised in energy.get('quantised', []):
        total = sum(quantised['ann'].values())
        ax.axhline(total / scale, color='black', linestyle=':', alpha=0.6,
                   label=f'{quantised["bits"]}-bit ANN ({total / scale:.4g} {unit})')
    ax.set_xlabel('time step t')
    ax.set_ylabel(f'energy of steps 1..t per image ({unit})')
    ax.set_xticks(steps if len(steps) <= 16 else steps[::max(1, len(steps) // 16)])
    ax.set_title(f'{prefix}: energy by class, model {energy["model"]}')
    ax.grid(True, axis='y', alpha=0.3)
    ax.legend(fontsize=7)
    _save_png(figure, Canvas, path)


def write_snn_reports(results: Dict, output_dir, savename: str, monitor=None, *, levels: bool = False,
                      plot: bool = False, ann_acc1: Optional[float] = None,
                      reduce: Optional[Callable] = None, write: bool = True, energy=None
                      ) -> Tuple[Dict[str, object], List[str]]:
    """Everything an snn run writes besides its log and results record, in ``output_dir``:
    ``<savename>_layers.csv`` (with a monitor), ``<savename>_levels.json`` (``levels``: the
    monitor counted them) and, with ``plot``, the figures of :func:`plot_results`.

    Under torchrun every process calls this (``reduce`` sums the counts over processes) and only
    the one with ``write`` writes. ``energy``: an :class:`energy.EnergyReport` (already reduced),
    whose classes the per-layer CSV gains; its summary is ``results['energy']``. Returns (entries
    for the results record, English lines for the log and the console); both are empty where
    ``write`` is False.
    """
    layer_records = document = None
    if monitor is not None:
        layer_records = monitor.layer_records(reduce)
        if levels:
            document = level_report(monitor.level_counts(reduce),
                                    _summed(monitor.level_batches_counted, reduce, monitor.sops.device))
    entries: Dict[str, object] = {}
    lines: List[str] = []
    if not write:
        return entries, lines
    output_dir = Path(output_dir)
    if layer_records is not None:
        path = output_dir / f'{savename}_layers.csv'
        write_layer_records(layer_records, path, energy=energy)
        entries['layer_report'] = str(path)
        lines.append(f'per-layer SOPs and firing rates ({len(monitor.names)} layers x '
                     f'{len(results["acc1"])} steps): {path}')
    if results.get('energy'):
        lines.extend(energy_lines(results['energy']))
    if document is not None:
        path = output_dir / f'{savename}_levels.json'
        utils.write_json(document, path)
        entries['level_counts'] = str(path)
        lines.append(f'{level_summary_line(document)}: {path}')
    if plot:
        figures = plot_results(results, output_dir, savename, ann_acc1=ann_acc1, layer_records=layer_records)
        entries['figures'] = [str(p) for p in figures]
        lines.append('figures: ' + ', '.join(str(p) for p in figures))
    return entries, lines


def energy_lines(energy: Dict) -> List[str]:
    """English lines of an energy summary (:meth:`energy.EnergyReport.summary`): per step the
    SNN's energy of steps 1..t by class and its ratio to the ANN's and the quantised ANNs'."""
    ann = sum(energy['ann'].values())
    quantised = energy.get('quantised', [])
    lines = [f'energy (model {energy["model"]}, pJ per image): ANN {ann:.4g} ('
             + ', '.join(f'{k} {v:.3g}' for k, v in energy['ann'].items() if v) + ')'
             + ''.join(f'; {q["bits"]}-bit ANN {sum(q["ann"].values()):.4g}' for q in quantised)]
    cumulative = dict.fromkeys(energy['per_step'][0], 0.0) if energy['per_step'] else {}
    for t, step in enumerate(energy['per_step'], start=1):
        for k, v in step.items():
            cumulative[k] += v
        split = ', '.join(f'{k} {v:.3g}' for k, v in cumulative.items() if v)
        line = f'  t={t}: SNN {sum(cumulative.values()):.4g} ({split}); vs ANN {energy["ratio"][t - 1]:.4f}'
        line += ''.join(f', vs {q["bits"]}-bit {q["ratio"][t - 1]:.4f}' for q in quantised)
        lines.append(line)
    return lines


def _summed(value: int, reduce: Optional[Callable], device) -> int:
    if reduce is None:
        return int(value)
    return int(reduce(torch.tensor([float(value)], dtype=torch.float64, device=device)).item())
