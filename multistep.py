"""Multi-step simulation (ECMT_SPEC 13): chunks of time steps folded time-major into the batch.

:class:`Chunk` is the clock every stateful module of a model shares: how many steps the next
forward pass holds, and whether they end the batch. :class:`MultiStep` opens a converted model for
chunked runs: it repeats the converted region's input K times and sets the shared clock before each
pass (``engine_for_finetuning.simulate`` drives it).
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ['Chunk', 'ONE_STEP', 'MultiStep']


class Chunk:
    """The chunk of steps a forward pass holds: ``steps`` K, and ``last``: whether they end the
    batch (a module then keeps no state afterwards). :class:`MultiStep` gives one object to every
    stateful module of a model and changes it before each pass; a module called on its own runs
    one step per call and keeps its state (:data:`ONE_STEP`)."""
    __slots__ = ('steps', 'last')

    def __init__(self, steps: int = 1, last: bool = False) -> None:
        self.steps, self.last = int(steps), bool(last)

    def __repr__(self) -> str:
        return f'Chunk(steps={self.steps}, last={self.last})'


ONE_STEP = Chunk(1, False)


class MultiStep:
    """Runs a converted model on chunks of time steps (ECMT_SPEC 13), layer by layer.

    While open, the input of the converted region (the output of the model's input modules,
    ``ecmt_input_modules``: the patch embedding of the unchanged image and the position
    embedding) is repeated K times, time-major, at the entry of the first region module called in
    a forward pass, so that the input modules run once per chunk and every later layer runs once
    on K*B rows. Every stateful module (found afresh at every open: no cache to go stale after
    module surgery) shares one :class:`Chunk`, which :meth:`chunk` sets before each pass. On
    leaving, the hooks are removed and every module is back to one step per call.
    """

    def __init__(self, model: nn.Module) -> None:
        from trans_utils import in_region, set_clock, skip_prefixes  # trans_utils imports this module
        self.model = model
        self.clock = Chunk(1, False)
        self.modules = set_clock(model, self.clock)
        self._entered = False
        skip = skip_prefixes(model)
        self.handles = [model.register_forward_pre_hook(self._new_pass)]
        for name, child in model.named_children():
            if in_region(name, skip):
                self.handles.append(child.register_forward_pre_hook(self._enter_region))

    @property
    def steps(self) -> int:
        return self.clock.steps

    def chunk(self, steps: int, last: bool) -> None:
        """The next forward pass runs ``steps`` steps; ``last``: they end the batch."""
        self.clock.steps, self.clock.last = int(steps), bool(last)

    def _new_pass(self, module, args) -> None:
        self._entered = False

    def _enter_region(self, module, args):
        if self._entered:
            return None
        self._entered = True
        steps = self.clock.steps
        if steps == 1 or not args:
            return None
        x = args[0]
        return (x.unsqueeze(0).expand(steps, *x.shape).flatten(0, 1), *args[1:])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        from trans_utils import set_clock
        set_clock(self.model, ONE_STEP)

    def __enter__(self) -> 'MultiStep':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
