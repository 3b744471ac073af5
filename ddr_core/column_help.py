"""What the columns of the channel table mean: one text per column, for the HTML report's header tooltips and
column list and the inspector's help tooltips."""

from __future__ import annotations

COLUMN_HELP = {
    "channel": "the layer channel (raw variant) or SAE feature index",
    "concept": "the concept the channel's top prompts share, significant against the labels permuted among "
               "prompts (Benjamini-Hochberg q below the level in the header); empty: none significant",
    "purity": "share of the channel's labelled top prompts (each prompt counted once) that carry its dominant "
              "concept; the channel page gives the chance share expected from how common each label is",
    "total frequency": "sum over the recorded timesteps of the share of generations in whose top-k channels it "
                       "is (conditional CFG half); 1.0 is, e.g., the top-k of every generation at one timestep",
    "active timesteps": "timesteps 0-999 where the interpolated activity profile is above 0",
    "peaks": "timesteps of the activity profile's peaks, highest first",
    "max activation": "largest spatial-mean activation over all generations and recorded timesteps",
    "examples": "dataset examples kept (the top generations at each recorded timestep)",
    "priors": "whether steered generations from the empty prompt exist",
    "dreams": "dreams shown: only those the optimiser raised above their start's seed-to-seed noise",
    "dream / top example": "mean over the shown dreams of the dream's activation divided by the channel's top "
                           "dataset example's activation at the nearest recorded timestep: above 1 the dream "
                           "drives the channel harder than any dataset image; negative when the two activations "
                           "have opposite signs",
    "top prompts": "prompts of the channel's top dataset examples at its top peak (data, shown as text)",
}


def column_help(name: str) -> str:
    """What a column means (``"purity"``, ``"concept (ground truth, BH q < 0.05)"``: the part before a bracket)."""
    return COLUMN_HELP.get(name.split(" (")[0], "")
