"""Draws docs/sp24_layout.png: where each kept value of one 16 x 32 tile of a 2:4 weight
lands in the packed mma.sp layout (which lane's registers hold it), read back from the
real packing op, not from a second copy of the rules.

    .venv/bin/python docs/draw_sp24_layout.py
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sparsekit as sk  # noqa: E402


def lane_of_each_kept_value():
    """A 16 x 32 2:4 tile whose kept values are their own ids; after packing, the lane
    whose 8 values hold id v is where value v lives."""
    gen = torch.Generator().manual_seed(3)
    keep = sk.masks.nm(torch.rand(16, 32, generator=gen), 2, 4)
    ids = torch.zeros(16, 32)
    ids[keep] = torch.arange(1, 257, dtype=torch.float32)  # exact in fp16
    t = sk.compress(ids.half(), 2, 4)
    packed_values, packed_meta = torch.ops.sparsekit.sp24_pack(t.values, t.metadata, 32)
    lanes = packed_values.view(-1, 32, 8)[0].float()  # first tile: [lane, 8 values]
    where = {}
    for lane in range(32):
        for slot in range(8):
            where[int(lanes[lane, slot])] = (lane, slot)
    lane_map = np.full((16, 32), np.nan)
    for r in range(16):
        for c in range(32):
            v = int(ids[r, c])
            if v:
                lane_map[r, c] = where[v][0]
    return lane_map, keep.numpy()


def main(path):
    lane_map, keep = lane_of_each_kept_value()
    fig, ax = plt.subplots(figsize=(10, 5.2))
    cmap = plt.get_cmap("tab20", 32)
    ax.imshow(np.where(keep, lane_map, np.nan), cmap=cmap, vmin=-0.5, vmax=31.5)
    for r in range(16):
        for c in range(32):
            if keep[r, c]:
                ax.text(c, r, int(lane_map[r, c]), ha="center", va="center", fontsize=6)
    for c in range(0, 33, 4):
        ax.axvline(c - 0.5, color="black", linewidth=0.6 if c % 16 else 1.6)
    ax.axhline(7.5, color="black", linewidth=1.6)
    ax.set_xticks(range(0, 32, 4))
    ax.set_yticks(range(16))
    ax.set_xlabel("K (logical column; 2:4 groups between thin lines, metadata halves "
                  "between thick ones)")
    ax.set_ylabel("weight row in the tile")
    ax.set_title("One mma.sp m16n8k32 tile of a 2:4 weight: the lane whose registers hold "
                 "each kept value\n(blank: pruned; lanes 4g and 4g+1 also supply the "
                 "metadata of rows g and g+8)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sp24_layout.png"))
