"""Names and defaults of the command line's choices, defined once (no torch import: ``--help``
and a bad flag answer at once).

The engine, the search, the energy model and both entry scripts import these; nothing else spells
them. Each tuple lists the choices in the order ``--help`` shows them, the default first.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

#: Neuron codings (ECMT_SPEC 4 and 14): 'rate' re-sends the whole activation every step,
#: 'differential' only the correction to its running estimate.
CODINGS: Tuple[str, ...] = ('rate', 'differential')
#: Kernel backends a converted model runs on ('auto' chooses per device): see ``kernels``.
BACKENDS: Tuple[str, ...] = ('native', 'triton', 'eager')
BACKEND_CHOICES: Tuple[str, ...] = ('auto',) + BACKENDS
#: Threshold granularity (ECMT_SPEC 15): one pair per place (section 3) or per channel.
THRESHOLD_GRANULARITIES: Tuple[str, ...] = ('place', 'channel')
#: Fire rules (ECMT_SPEC 15): 'ecmt' is section 4, 'round' rounds to the nearest level.
FIRE_RULES: Tuple[str, ...] = ('ecmt', 'round')
#: Energy models of the report (``energy.ENERGY_MODELS`` holds their figures, keyed by these).
ENERGY_MODELS: Tuple[str, ...] = ('ecmt', 'fp32', 'fp16', 'int8', 'fp32_memory')

# The --target_T threshold search (``low_latency``).
#: Candidate global percents, highest first: on equal objectives the first (fewer spikes) wins.
#: One by default (the published 0.99): the global-scale stage does what more percents did, at a
#: fraction of the cost (docs/low_latency.md). Before the global-scale stage the default was
#: (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8), with a budget of 128 on 512 images.
DEFAULT_PERCENTS: Tuple[float, ...] = (0.99,)
#: Candidate global threshold scales (``threshold_scale``, ECMT_SPEC 15), relative to the scale the
#: conversion asks for: a geometric grid of factor 2 around 1, highest first (on equal objectives
#: the first, fewer spikes, wins), each one T-step simulation. Few steps want lower thresholds.
DEFAULT_SCALES: Tuple[float, ...] = tuple(2.0 ** k for k in range(1, -7, -1))
#: Candidate evaluations in all (the percents' and the global scales' included): each is one
#: T-step simulation.
DEFAULT_BUDGET = 40
#: Calibration images the objective is computed on (the first ones of the calibration loader).
DEFAULT_SEARCH_IMAGES = 256
#: Memory for the search's block cache (block inputs of the current best thresholds), MiB.
DEFAULT_CACHE_MIB = 2048
#: Weight of the earlier steps in the objective (``--search_prefix_weight``).
DEFAULT_PREFIX_WEIGHT = 0.13
#: Weight of the energy after T steps (ECMT_SPEC 8, relative to the ANN) added to the search's
#: objective (``--search_energy_weight``); 0: accuracy alone, as before.
DEFAULT_ENERGY_WEIGHT = 0.0
#: The search's objectives, by name (``low_latency.OBJECTIVES`` holds the functions).
OBJECTIVE_NAMES: Tuple[str, ...] = ('kl', 'mse')


# The conversion options a for_v checkpoint records (``records.record_options`` /
# ``records.restore_options``): for_v writes each into its ``calibration`` record under its name
# (the flag's value, or ``default`` where the flag is None); snn takes each from there when the
# flag is not on the command line, and the snn results record holds each; a flag on the command
# line that differs from the record is one error naming both values; a checkpoint without the entry
# (the published scripts', older ones) runs with ``default``. To add an option: a parser flag whose
# dest is the option's name, best with ``default=None`` (so --help does not claim a value the record
# may override), one line here, e.g.
#     RecordedOption('thresholds', 'place', THRESHOLD_GRANULARITIES),
#     RecordedOption('fire_rule', 'ecmt', FIRE_RULES),
#     RecordedOption('threshold_scale', 1.0, None, float),
# and read ``args.<name>`` (set by ``restore_options`` at snn) where the conversion is called.
class RecordedOption(NamedTuple):
    """A conversion option the thresholds were calibrated for: `name` is the flag's dest and the
    record's key; `choices` (None: any value of `kind`) validates what a record holds."""
    name: str
    default: object
    choices: Optional[Tuple] = None
    kind: type = str


RECORDED_OPTIONS: Tuple[RecordedOption, ...] = (
    RecordedOption('coding', 'rate', CODINGS),
    RecordedOption('thresholds', 'place', THRESHOLD_GRANULARITIES),
    RecordedOption('fire_rule', 'ecmt', FIRE_RULES),
    RecordedOption('threshold_scale', 1.0, None, float),
)
