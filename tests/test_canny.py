"""Built-in canny edges (omg.canny), on images whose edges are known: what cv2.Canny(rgb, 100, 200) gives."""
import torch

from omg.canny import canny


def rectangle(value=1.0, channel=None, size=(24, 32), box=(6, 8, 18, 24)):
    image = torch.zeros(3, *size)
    y0, x0, y1, x1 = box
    if channel is None:
        image[:, y0:y1, x0:x1] = value
    else:
        image[channel, y0:y1, x0:x1] = value
    return image


def test_a_step_gives_a_one_pixel_closed_outline():
    edges = canny(rectangle())[0]
    assert edges.shape == (24, 32) and set(edges.unique().tolist()) == {0.0, 1.0}
    # the Sobel response is equal on both sides of a step; OpenCV keeps the pixel before it (> behind, >= ahead)
    rows = edges[8:16]
    assert (rows.sum(dim=1) == 2).all() and (rows[:, 7] == 1).all() and (rows[:, 23] == 1).all()
    cols = edges[:, 10:22]
    assert (cols.sum(dim=0) == 2).all() and (cols[5] == 1).all() and (cols[17] == 1).all()
    assert edges[:4].sum() == 0 and edges[20:].sum() == 0 and edges[9:15, 10:22].sum() == 0  # nothing off the edge


def test_thresholds_and_hysteresis():
    """A vertical step of 40/255 has L1 Sobel magnitude 4 * 40 = 160: between low 100 and high 200, weak."""
    def step(top: float, bottom: float) -> torch.Tensor:  # a step at column 16, its height changing halfway down
        image = torch.zeros(3, 24, 32)
        image[:, :12, 16:], image[:, 12:, 16:] = top, bottom
        return image
    assert canny(step(40 / 255, 40 / 255)).sum() == 0  # weak and connected to nothing
    assert canny(step(40 / 255, 40 / 255), low=100, high=150)[0, :, 15].sum() == 24  # now strong
    assert canny(step(20 / 255, 20 / 255), low=100, high=150).sum() == 0  # below low
    # the weak lower half is 8-connected to the strong upper half: kept whole (a shorter weak edge of its own
    # elsewhere would not be)
    edges = canny(step(1.0, 40 / 255))[0]
    assert edges[:11, 15].sum() == 11 and edges[13:, 15].sum() == 11  # (rows 11-12: the step's own corner)


def test_each_pixel_uses_its_strongest_channel():
    """cv2.Canny on a colour image takes, per pixel, the gradient of the channel where it is largest."""
    assert torch.equal(canny(rectangle(channel=2)), canny(rectangle()))
    assert torch.equal(canny(rectangle()[:1]), canny(rectangle()))
