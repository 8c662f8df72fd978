"""Record a pipeline run and draw the denoising of one cell as an animated GIF.

>>> states = record_denoising(pipe, gene_ids=genes, ranks=ranks, mask_ratio=0.8, generator=generator)
>>> write_denoising_gif(states, "denoising.gif", num_rank_bins=50, title="80% of the genes masked")
"""

from __future__ import annotations

import math
import os

import numpy as np


def record_denoising(pipe, gene_ids, **call_kwargs) -> list[np.ndarray]:
    """Run `pipe` on one cell and return its rank tokens after every step, the masked input first.

    `[MASK]` is `num_rank_bins + 1`; the last state is the pipeline's output.
    """
    states = []

    def record(pipe, step, timestep, callback_kwargs):
        sample, cell, position = (callback_kwargs[k].cpu().numpy() for k in ("sample", "cell", "position"))
        state = np.full(len(gene_ids), -1, dtype=sample.dtype)
        for row in np.flatnonzero(cell == 0):  # the cell's windows (one when it fits the model's length)
            real = position[row] >= 0
            state[position[row, real]] = sample[row, real]
        states.append(state)

    output = pipe(
        gene_ids=[list(np.asarray(gene_ids).tolist())],
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["sample", "cell", "position"],
        **call_kwargs,
    )
    first = np.asarray(output.ranks[0]).copy()
    first[output.mask[0]] = pipe.scheduler.config.mask_token_id
    return [first, *states] if states else [first, np.asarray(output.ranks[0])]


def write_denoising_gif(
    states: list[np.ndarray],
    path: str | os.PathLike,
    *,
    num_rank_bins: int,
    title: str = "",
    fps: int = 8,
) -> str:
    """Draw each state as a square grid of the cell's genes, coloured by rank (grey = masked), as a GIF.

    Args:
        states: rank tokens of one cell per step (see [`record_denoising`]); `num_rank_bins + 1` is `[MASK]`.
        path: where to write the GIF.
        num_rank_bins: B, so the colour scale runs over 0..B.
        title: shown above the grid with the step and the share still masked.
        fps: frames per second; the last frame is held for a second.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import animation
    from matplotlib import pyplot as plt

    length = len(states[0])
    side = math.ceil(math.sqrt(length))

    def grid(state):
        cells = np.full(side * side, np.nan)
        cells[:length] = np.where(state > num_rank_bins, np.nan, state)
        return cells.reshape(side, side)

    colours = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    figure, axes = plt.subplots(figsize=(5.0, 4.4), dpi=100)
    image = axes.imshow(grid(states[0]), cmap=colours, vmin=0, vmax=num_rank_bins, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    bar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    bar.set_label("rank token (0 = not expressed); grey = masked")
    heading = axes.set_title("")
    frames = list(range(len(states))) + [len(states) - 1] * fps

    def draw(frame):
        state = states[frame]
        masked = np.mean(state > num_rank_bins)
        heading.set_text(f"{title}\nstep {frame} of {len(states) - 1}: {masked:.0%} of {length} genes masked")
        image.set_data(grid(state))
        return (image, heading)

    draw(0)
    figure.tight_layout()  # with a two-line title in place
    movie = animation.FuncAnimation(figure, draw, frames=frames, blit=False)
    movie.save(path, writer=animation.PillowWriter(fps=fps))
    plt.close(figure)
    return str(path)
