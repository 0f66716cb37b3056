"""Plain, slow, literal reference implementations of the ECMT rules (ECMT_SPEC sections 3-6, the
differential neuron of 14 and the per-channel thresholds and rounding fire rule of 15).

Nothing here is meant to be fast: each function restates its section of the spec as directly as
possible, so that the optimised code in ``trans_utils`` can be held to it.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch


FIRE_RULES = ('ecmt', 'round')


def ref_fire_threshold(theta: torch.Tensor, j: int, fire_rule: str = 'ecmt') -> torch.Tensor:
    """The membrane at which level j of a side with base threshold θ fires: ECMT_SPEC 4
    (``'ecmt'``) θ·2^j − θ/2; ECMT_SPEC 15 (``'round'``) 0.75·θ·2^j for j >= 1 (the midpoint
    between levels j−1 and j), θ/2 for j = 0, computed as θ times the exact float 0.75·2^j or
    0.5."""
    if fire_rule == 'ecmt':
        return theta * 2 ** j - theta / 2
    if fire_rule == 'round':
        return theta * (0.75 * 2 ** j if j >= 1 else 0.5)
    raise ValueError(f'unknown fire rule {fire_rule!r}')


def _thresholds(theta, membrane: torch.Tensor) -> torch.Tensor:
    """θ as float32 (the neuron's buffers are), one number or broadcast to the membrane's shape."""
    theta = torch.as_tensor(theta, dtype=torch.float32).detach().to(membrane.device)
    if theta.numel() == 1:
        return theta.reshape(())
    return torch.broadcast_to(theta, membrane.shape)


def ref_fire(membrane: torch.Tensor, theta_p, theta_n, levels: int, fire_rule: str = 'ecmt') -> torch.Tensor:
    """ECMT_SPEC 4's fire rule (15's with ``fire_rule='round'``), literally, for a membrane that
    already holds this step's input: try levels j = N-1 .. 0, at each level the positive side
    first (v >= the fire threshold of θp at level j, :func:`ref_fire_threshold`, emits +θp·2^j),
    then the negative side (−v >= that of θn emits −θn·2^j); the first that fires wins; a side
    whose threshold is not positive (0, negative, NaN) never fires. Thresholds are float32 numbers,
    as the neuron's buffers are: one pair, or tensors that broadcast against the membrane (one
    threshold per channel, each element with its own)."""
    theta_p, theta_n = _thresholds(theta_p, membrane), _thresholds(theta_n, membrane)
    alive_p, alive_n = theta_p > 0, theta_n > 0
    spike = torch.zeros_like(membrane)
    decided = torch.zeros_like(membrane, dtype=torch.bool)
    for j in range(levels - 1, -1, -1):
        fire = ~decided & alive_p & (membrane >= ref_fire_threshold(theta_p, j, fire_rule))
        spike = torch.where(fire, theta_p * 2 ** j, spike)
        decided |= fire
        fire = ~decided & alive_n & (-membrane >= ref_fire_threshold(theta_n, j, fire_rule))
        spike = torch.where(fire, -(theta_n * 2 ** j), spike)
        decided |= fire
    return spike


def ref_mt_neuron(xs: Sequence[torch.Tensor], theta_p, theta_n, levels: int, coding: str = 'rate',
                  fire_rule: str = 'ecmt') -> List[torch.Tensor]:
    """ECMT_SPEC 4, literally: the outputs of one MT neuron fed ``xs`` (one tensor per step);
    thresholds as :func:`ref_fire` takes them.

    Each step: v += x; the spike of :func:`ref_fire`; v -= spike; the output is the spike.
    ``coding='differential'``: the outputs y of ECMT_SPEC 14 (:func:`ref_differential_neuron`).
    """
    if coding == 'differential':
        return ref_differential_neuron(xs, theta_p, theta_n, levels, fire_rule)[0]
    if coding != 'rate':
        raise ValueError(f'unknown coding {coding!r}')
    membrane = None
    spikes = []
    for x in xs:
        x = x.float()
        membrane = x.clone() if membrane is None else membrane + x
        spike = ref_fire(membrane, theta_p, theta_n, levels, fire_rule)
        membrane = membrane - spike
        spikes.append(spike)
    return spikes


def ref_differential_neuron(xs: Sequence[torch.Tensor], theta_p, theta_n, levels: int, fire_rule: str = 'ecmt'
                            ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """ECMT_SPEC 14, literally: (outputs y_t, spikes s_t, estimates r_t after each step) of one
    differential neuron fed ``xs``. v and r start at zero; step t = 1, 2, ...:
        u = (v + x_t) - r        (this float order, the one every backend follows)
        s = ref_fire(u)          (ECMT_SPEC 4's rule on u, or 15's with fire_rule='round')
        v = u - s
        y_t = r + s
        r = r + s / t            (s / t rounded first, then added)
    all in float32."""
    membrane = estimate = None
    outputs, spikes, estimates = [], [], []
    for t, x in enumerate(xs, start=1):
        x = x.float()
        if membrane is None:
            membrane, estimate = torch.zeros_like(x), torch.zeros_like(x)
        u = (membrane + x) - estimate
        s = ref_fire(u, theta_p, theta_n, levels, fire_rule)
        membrane = u - s
        outputs.append(estimate + s)
        estimate = estimate + s / torch.full_like(s, float(t))
        spikes.append(s)
        estimates.append(estimate)
    return outputs, spikes, estimates


def ref_ec(f: Callable[[torch.Tensor], torch.Tensor], xs: Sequence[torch.Tensor]
           ) -> List[torch.Tensor]:
    """ECMT_SPEC 5, as the original computes it: f evaluated twice per step.

    A_t = x_1 + ... + x_t; out_t = t·f(A_t/t) − (t−1)·f(A_{t−1}/(t−1)) (second term 0 at t = 1).
    Computed in float64 so that it is a reference for the float32 code, not a copy of it.
    """
    outs = []
    cum = None
    for t, x in enumerate(xs, start=1):
        prev = cum
        cum = x.double().clone() if prev is None else prev + x.double()
        out = t * f(cum / t)
        if prev is not None:
            out = out - (t - 1) * f(prev / (t - 1))
        outs.append(out)
    return outs


def ref_ec_product(as_: Sequence[torch.Tensor], bs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """ECMT_SPEC 6 with the original's three products per step.

    With A_t = A_{t−1} + a_t and B_t = B_{t−1} + b_t:
        A_t B_t / t − A_{t−1} B_{t−1} / (t−1)
      = (A_{t−1} b_t + a_t B_{t−1} + a_t b_t + A_{t−1} B_{t−1}) / t − A_{t−1} B_{t−1} / (t−1)
      = (A_{t−1} b_t + a_t B_{t−1} + a_t b_t) / t − A_{t−1} B_{t−1} / (t (t−1)),
    since 1/t − 1/(t−1) = −1/(t(t−1)). At t = 1 it is a_1 b_1. Float64.
    """
    outs = []
    cum_a = cum_b = None
    for t, (a, b) in enumerate(zip(as_, bs), start=1):
        a, b = a.double(), b.double()
        if t == 1:
            out = a @ b
            cum_a, cum_b = a.clone(), b.clone()
        else:
            out = (cum_a @ b + a @ cum_b + a @ b) / t - (cum_a @ cum_b) / (t * (t - 1))
            cum_a, cum_b = cum_a + a, cum_b + b
        outs.append(out)
    return outs


def ref_running_sums(xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """ECMT_SPEC 6's running sums, literally: A_1 = x_1, A_t = A_(t-1) + x_t, in float32."""
    sums, cum = [], None
    for x in xs:
        cum = x.float().clone() if cum is None else cum + x.float()
        sums.append(cum)
    return sums


def ref_product_differences(products: Sequence[torch.Tensor], scale=None
                            ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """ECMT_SPEC 6's outputs from the products P_t of the running sums (P_t = A_t·B_t), step by
    step in float32: total_t = P_t / t (a correctly rounded division), out_t = total_t −
    total_(t−1) (total_1 alone at t = 1), then times ``scale`` (the model's q·kᵀ scale) if given.
    Returns (the outputs, the totals)."""
    outs, totals, previous = [], [], None
    for t, product in enumerate(products, start=1):
        product = product.float()
        total = product / torch.full_like(product, float(t))
        out = total if previous is None else total - previous
        outs.append(out if scale is None else out * scale)
        totals.append(total)
        previous = total
    return outs, totals


def ref_quantiles(x: torch.Tensor, percent: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """ECMT_SPEC 3 by a full sort: (k_hi-th smallest, k_lo-th smallest), 1-based,
    k_hi = int(percent·n), k_lo = int((1 − percent)·n), each at least 1."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    ordered = torch.sort(flat).values
    k_hi = max(1, int(percent * n))
    k_lo = max(1, int((1 - percent) * n))
    return ordered[k_hi - 1], ordered[k_lo - 1]


# ---------------------------------------------------------------------------------------------
# A whole converted model, step by step
# ---------------------------------------------------------------------------------------------
class RefNeuron(torch.nn.Module):
    """ECMT_SPEC 4 one step per call, with the literal level-by-level rule of ref_mt_neuron; with
    ``coding='differential'`` the neuron of ECMT_SPEC 14 (ref_differential_neuron), whose output
    is y = r + s; ``fire_rule='round'``: ECMT_SPEC 15's rule. Thresholds as :func:`ref_fire` takes
    them (numbers, or tensors that broadcast against the input)."""

    def __init__(self, theta_p, theta_n, levels: int, coding: str = 'rate', fire_rule: str = 'ecmt') -> None:
        super().__init__()
        if coding not in ('rate', 'differential'):
            raise ValueError(f'unknown coding {coding!r}')
        if fire_rule not in FIRE_RULES:
            raise ValueError(f'unknown fire rule {fire_rule!r}')
        self.theta_p, self.theta_n, self.levels, self.coding = theta_p, theta_n, levels, coding
        self.fire_rule = fire_rule
        self.membrane = self.estimate = None
        self.t = 0

    def forward(self, x):
        x = x.float()
        self.t += 1
        if self.coding == 'differential':
            if self.membrane is None:
                self.membrane, self.estimate = torch.zeros_like(x), torch.zeros_like(x)
            u = (self.membrane + x) - self.estimate
            spike = ref_fire(u, self.theta_p, self.theta_n, self.levels, self.fire_rule)
            self.membrane = u - spike
            out = self.estimate + spike
            self.estimate = self.estimate + spike / torch.full_like(spike, float(self.t))
            return out
        membrane = x.clone() if self.membrane is None else self.membrane + x
        spike = ref_fire(membrane, self.theta_p, self.theta_n, self.levels, self.fire_rule)
        self.membrane = membrane - spike
        return spike


class RefEC(torch.nn.Module):
    """ECMT_SPEC 5 one step per call: A += x; out = t·f(A/t) − (t−1)·f(A'/(t−1)), the second term
    remembered from the step before (the spec's "evaluating it once and remembering"), float32."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f, self.cum, self.prev, self.t = f, None, None, 0

    def forward(self, x):
        x = x.float()
        self.t += 1
        self.cum = x.clone() if self.cum is None else self.cum + x
        total = self.f(self.cum / self.t).float() * self.t
        out = total if self.prev is None else total - self.prev
        self.prev = total
        return out


class RefProduct(torch.nn.Module):
    """ECMT_SPEC 6 one step per call: out = A_t∘B_t/t − A_(t−1)∘B_(t−1)/(t−1), float32, with ∘
    ``op`` (a matrix or an element-wise product)."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op, self.cum_a, self.cum_b, self.prev, self.t = op, None, None, None, 0

    def forward(self, a, b, scale=None):
        a, b = a.float(), b.float()
        self.t += 1
        self.cum_a = a.clone() if self.cum_a is None else self.cum_a + a
        self.cum_b = b.clone() if self.cum_b is None else self.cum_b + b
        total = self.op(self.cum_a, self.cum_b).float() / self.t
        out = total if self.prev is None else total - self.prev
        self.prev = total
        return out if scale is None else out * scale  # the model's (q·kᵀ) * scale


def ref_simulate(model: torch.nn.Module, images: torch.Tensor, steps: int, analog: bool = False) -> torch.Tensor:
    """The head's output of every step, [steps, B, classes], of a converted SNN run one whole step
    of the network at a time, as the published scripts did: a copy of ``model`` whose MT neurons,
    EC modules and EC products are replaced by the literal one-step modules above (thresholds,
    levels and wrapped functions taken from the converted ones), called ``steps`` times on the
    same images. Independent of the toolkit's multi-step code.

    ``analog=True``: every MT neuron passes its input on unchanged (no quantisation), the EC
    modules and products stay literal. By ECMT_SPEC 5 and 6 the outputs summed over steps 1..t are
    then t times the ANN's output at every t, whatever constants (biases, position terms) the
    model adds at each step: a check of how those constants enter the expectation."""
    import copy
    import trans_utils
    model = copy.deepcopy(model)

    def neuron(module):
        if analog:
            return torch.nn.Identity()
        # The neuron's thresholds of any shape (one pair, or per channel: they broadcast against
        # the input as the module sees it) and its fire rule (ECMT_SPEC 4 unless it says 15's).
        return RefNeuron(module.scale_p.detach().clone(), module.scale_n.detach().clone(), module.levels,
                         module.coding, getattr(module, 'fire_rule', 'ecmt'))

    def literal(module):
        # A fused EC module + neuron (trans_utils.ECNeuron, checked before its base class) is
        # the two literal modules in turn; the fused EC module's own place passes its input on.
        if isinstance(module, trans_utils.ECNeuron):
            return torch.nn.Sequential(RefEC(module.ec_function), neuron(module))
        if isinstance(module, trans_utils.ECPassThrough):
            return torch.nn.Identity()
        if isinstance(module, trans_utils.TwoSideNeuron):
            return neuron(module)
        if isinstance(module, trans_utils.exp_comp_neuron):
            return RefEC(module.module)
        if isinstance(module, trans_utils.AtNeuron):
            return RefProduct(torch.matmul)
        if isinstance(module, trans_utils.MulNeuron):
            return RefProduct(torch.mul)
        return None

    def swap(parent):
        if getattr(parent, 'fuse_qkv', False):
            parent.fuse_qkv = False  # the attention splits qkv into views for its three neurons
        for name, child in parent.named_children():
            replacement = literal(child)
            if replacement is not None:
                setattr(parent, name, replacement)
            else:
                swap(child)

    swap(model)
    with torch.no_grad():
        return torch.stack([model(images).float() for _ in range(steps)])
