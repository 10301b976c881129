import torch

from infdit_cli.images import fill_transparent


def test_fill_transparent_bleeds_nearest_visible_colour():
    rgb = torch.zeros(1, 3, 8, 8)
    alpha = torch.zeros(1, 1, 8, 8)
    rgb[:, 0, :, :4] = 1.0  # opaque red on the left half
    alpha[:, :, :, :4] = 1.0
    out = fill_transparent(rgb, alpha)
    assert torch.equal(out[..., :4], rgb[..., :4])  # visible pixels untouched
    assert out[:, 0, :, 4:].min() > 0.99 and out[:, 1:, :, 4:].abs().max() < 1e-6  # red, not black


def test_fill_transparent_noop_when_opaque():
    rgb = torch.rand(1, 3, 5, 7)
    assert torch.equal(fill_transparent(rgb, torch.ones(1, 1, 5, 7)), rgb)
