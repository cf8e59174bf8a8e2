"""`loss.png`: the training curves drawn by matplotlib, read back by matplotlib's own PNG reader."""

import numpy as np

from qlora_compile.train.plots import write_training_plot


def test_loss_png_is_a_valid_image(tmp_path):
    """The asked size, and the three curves' colours drawn (a NaN leaves a gap, not an error)."""
    from matplotlib import colors, image

    path = tmp_path / "loss.png"
    write_training_plot(path, [(1, 3.0), (2, 2.5), (3, float("nan")), (4, 2.0)], [(0, 3.2), (4, 2.1)],
                        [(1, 1e-3), (2, 1e-3), (3, 5e-4), (4, 0.0)], w=320, h=200)  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)[..., :3]
    assert pixels.shape == (200, 320, 3)
    for name in ("tab:blue", "tab:red", "tab:green"):
        near = np.abs(pixels - np.array(colors.to_rgb(name))).max(-1) < 0.02
        assert near.sum() > 20, name
