"""The 64-bit indexing promise of channel_partial_conv2d, tested above 2^31 elements (slow: run by
`make fuzz`, deselected by `make test`): x of 2 * 32768 * 32769 = 2^31 + 65536 fp16 elements in
channels_last, so that both the convolved channel 0 and the passed-through channel 1 of the last
pixels sit beyond element 2^31; x + out = 8.0 GiB. Sampled outputs, including the last ones, are
checked against a float64 evaluation of the formula."""
import pytest
import torch

import trous  # noqa: F401

ops = torch.ops.trous


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["direct"])
def test_channel_partial_beyond_2_31_elements(algo):
    N, C, H, W = 1, 2, 32768, 32769
    assert N * C * H * W > 2**31
    try:
        x = torch.empty((N, H, W, C), dtype=torch.float16).permute(0, 3, 1, 2)
    except RuntimeError as e:  # pragma: no cover - not enough memory
        pytest.skip(f"cannot allocate 4 GiB: {e}")
    g = torch.Generator().manual_seed(0)
    # Cheap to fill: every row of channel c is one random row tiled, and every 7th column depends on h.
    base = torch.randn(C, 4096, generator=g).half()
    for c in range(C):
        x[0, c] = base[c].repeat(W // 4096 + 1)[:W].expand(H, W)
        x[0, c, :, 1::7] = (torch.arange(H, dtype=torch.float32) % 13 / 13 - 0.5).half()[:, None]
    w = torch.randn(1, 1, 3, 3, generator=g).half()
    out = ops.channel_partial_conv2d(x, w, [1, 1], [1, 1], algo)
    assert out.stride() == x.stride()
    xd, wd = x, w[0, 0].double()

    def conv_at(h, c):
        acc = 0.0
        for r in range(3):
            for s in range(3):
                y, z = h + r - 1, c + s - 1
                if 0 <= y < H and 0 <= z < W:
                    acc += float(wd[r, s]) * float(xd[0, 0, y, z])
        return acc

    points = [(0, 0), (1, 5), (H // 2, W // 2), (H - 2, W - 3), (H - 1, W - 1), (H - 1, 0), (H - 1, W - 2)]
    for h, c in points:
        off = out[0, 0, h, c]
        flat = (h * W + c) * C  # element offset of (0, 0, h, c) in channels_last
        got = float(off)
        want = conv_at(h, c)
        assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), (h, c, flat, got, want)
        assert float(out[0, 1, h, c]) == float(x[0, 1, h, c]), (h, c)
    assert (H - 1) * W * C + (W - 1) * C >= 2**31, "the last pixels are beyond element 2^31"
