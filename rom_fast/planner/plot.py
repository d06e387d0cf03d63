"""A PNG of a plan: kept rank and retained output energy per layer."""

from __future__ import annotations

from typing import Dict

from rom_fast import plans
from rom_fast.planner.measure import LayerSpectrum


def plot_plan(spectra: Dict[str, LayerSpectrum], plan: plans.RankPlan, shape: plans.ModelShape,
              path: str) -> None:
    """PNG: per layer (in model order), the kept rank as a fraction of full rank and the
    retained output energy, one line per linear type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: Dict[str, list] = {}
    kept_fraction = {n: k / shape.mlp_size(mlp)[1] for mlp, k in plan.neurons.items()
                     for n in shape.mlp_linears(mlp)}
    for name, s in spectra.items():
        kind = name.rsplit(".", 1)[-1]
        full = min(s.d_out, s.d_in)
        frac = kept_fraction.get(name, plan.ranks.get(name, full) / full)
        kinds.setdefault(kind, []).append((shape.block_of[name], frac, plan.details["retained_energy"][name]))
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for kind, pts in kinds.items():
        blocks, frac, energy = zip(*pts)
        axes[0].plot(blocks, frac, marker=".", label=kind)
        axes[1].plot(blocks, energy, marker=".", label=kind)
    axes[0].set_ylabel("rank / full rank\n(kept neurons / all)")
    axes[1].set_ylabel("retained output energy")
    axes[1].set_xlabel("block")
    axes[0].set_title(plan.description)
    axes[0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
