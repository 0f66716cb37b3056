"""Which timm transformer names convert, and whether their ``ann`` logits equal timm's.

Every ``eva*``, ``*rope*``, ``*siglip*``, ``deit*`` and ``vit_*`` name timm lists is built with one
block at a small size (width 64 where the architecture allows, a few patches per side), random
weights of trained scale; a convertible model must have timm's state_dict keys and timm's logits
(relative error below 1e-4); a refused one is listed with the first words of its reason.
Prints one summary line and the refusals. A few minutes on one CPU core.
    python benchmarks/timm_names.py [PATTERN ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

import model_base  # noqa: E402
from trans_utils import ConversionError  # noqa: E402

PATTERNS = ('eva*', '*rope*', '*siglip*', 'deit*', 'vit_*')


def image_size(name: str) -> int:
    return 56 if 'patch14' in name else 32 if 'patch8' in name else 64


def build(name: str):
    """(timm model, kwargs) at the smallest size among a few that the architecture accepts."""
    size = image_size(name)
    small = dict(depth=1, img_size=size, num_classes=10)
    for kwargs in (dict(small, embed_dim=64, num_heads=4), dict(small, embed_dim=64, num_heads=4, num_kv_heads=2),
                   small, dict(depth=1, num_classes=10)):
        try:
            torch.manual_seed(0)
            return timm.create_model(name, **kwargs).eval(), kwargs
        except Exception:  # noqa: BLE001 - this size does not fit the architecture: try the next
            continue
    raise RuntimeError(f'{name}: no small size builds')


def main(patterns) -> int:
    torch.set_num_threads(1)
    names = sorted({n for p in patterns for n in timm.list_models(p)})
    converted, refused, mismatched, worst = 0, {}, [], 0.0
    for name in names:
        plain, kwargs = build(name)
        try:
            model = model_base.create_model(name, **kwargs).eval()
        except ConversionError as exc:
            refused[name] = str(exc)
            continue
        with torch.no_grad():
            for module in plain.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0, module.in_features ** -0.5)
            model.load_state_dict(plain.state_dict(), strict=True)
            size = plain.patch_embed.img_size[0]
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
            want = plain(x)
            error = ((model(x) - want).norm() / want.norm()).item()
        converted += 1
        worst = max(worst, error)
        if error > 1e-4 or list(model.state_dict()) != list(plain.state_dict()):
            mismatched.append(f'{name} ({error:.2e})')
    print(f'{len(names)} names: {converted} convert (largest relative logit error {worst:.1e}), '
          f'{len(refused)} refused, {len(mismatched)} differ from timm: {", ".join(mismatched) or "none"}')
    for name, reason in refused.items():
        print(f'  refused {name}: {reason[:110]}')
    return 1 if mismatched else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:] or PATTERNS))
