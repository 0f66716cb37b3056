"""Which timm transformer names convert, and whether their ``ann`` logits equal timm's.

Every ``eva*``, ``*rope*``, ``*siglip*``, ``deit*``, ``vit_*``, ``beit*``, ``cait*``, ``swin*``
and ``xcit*`` name timm lists is built with one block (Swin: two stages of two blocks) at a small
size (width 64 where the architecture allows, a few patches per side), random weights of trained
scale (linear layers, position tables, LayerScale and norm weights: no block adds nothing); a
convertible model must have timm's state_dict keys and timm's logits (relative error below 1e-4);
a refused one is listed with the first words of its reason. Prints one line per pattern, one
summary line, and the refusals. A few minutes on one CPU core.
    python benchmarks/timm_names.py [PATTERN ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

import model_base  # noqa: E402
from trans_utils import ConversionError  # noqa: E402

PATTERNS = ('eva*', '*rope*', '*siglip*', 'deit*', 'vit_*', 'beit*', 'cait*', 'swin*', 'xcit*')


def image_size(name: str) -> int:
    return 56 if 'patch14' in name else 32 if 'patch8' in name else 64


def build(name: str):
    """(timm model, kwargs) at the smallest size among a few that the architecture accepts."""
    size = image_size(name)
    small = dict(depth=1, img_size=size, num_classes=10)
    # Swin: 16x16 patches in 4x4 windows (shifted in the second block), then 8x8.
    stages = dict(img_size=64, num_classes=10, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4)
    for kwargs in (dict(small, embed_dim=64, num_heads=4), dict(small, embed_dim=64, num_heads=4, num_kv_heads=2),
                   stages, small, dict(depth=1, num_classes=10)):
        try:
            torch.manual_seed(0)
            return timm.create_model(name, **kwargs).eval(), kwargs
        except Exception:  # noqa: BLE001 - this size does not fit the architecture: try the next
            continue
    raise RuntimeError(f'{name}: no small size builds')


def main(patterns) -> int:
    torch.set_num_threads(1)
    by_pattern = {p: sorted(timm.list_models(p)) for p in patterns}
    names = sorted({n for listed in by_pattern.values() for n in listed})
    converted, refused, mismatched, worst = set(), {}, [], 0.0
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
            # Position tables start at zero, LayerScale near it, Swin V2's post-norms at zero.
            for key, param in plain.named_parameters():
                leaf = key.rsplit('.', 1)[-1]
                if leaf == 'relative_position_bias_table':
                    param.normal_(0, 0.5)
                elif leaf in ('gamma_1', 'gamma_2', 'gamma') or key.endswith(('norm1.weight', 'norm2.weight')):
                    param.normal_(1, 0.2)
            model.load_state_dict(plain.state_dict(), strict=True)
            size = plain.patch_embed.img_size[0]
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
            want = plain(x)
            error = ((model(x) - want).norm() / want.norm()).item()
        converted.add(name)
        worst = max(worst, error)
        if error > 1e-4 or list(model.state_dict()) != list(plain.state_dict()):
            mismatched.append(f'{name} ({error:.2e})')
    for pattern, listed in by_pattern.items():
        print(f'  {pattern}: {len(listed)} names, {len(converted & set(listed))} convert')
    print(f'{len(names)} names: {len(converted)} convert (largest relative logit error {worst:.1e}), '
          f'{len(refused)} refused, {len(mismatched)} differ from timm: {", ".join(mismatched) or "none"}')
    for name, reason in refused.items():
        print(f'  refused {name}: {reason[:110]}')
    return 1 if mismatched else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:] or PATTERNS))
