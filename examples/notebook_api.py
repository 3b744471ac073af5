"""Reading ddr results in Python (what a notebook does): `python examples/notebook_api.py [DATA_ROOT]`.

Prints, for every variant with results, its most active channels and, for the most active channel with dreams,
its top dataset examples, priors and dreams; `--save FILE` writes that channel's first dream image (first
variant). Needs no Dagster: only the files under the data root.
"""

from __future__ import annotations

import argparse

import polars as pl

from ddr_core.results import Results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", nargs="?", default=None, help="data root (default DDR_DATA_ROOT or data/)")
    parser.add_argument("--experiment", default=None)
    parser.add_argument("--save", default=None, help="save the first dream image of the first channel here (PNG)")
    args = parser.parse_args(argv)

    results = Results(args.data_root, args.experiment)
    print(results)
    for variant in results.variants():
        channels = results.channels(variant).sort("max_activation", descending=True, nulls_last=True)
        print(f"\n== {variant}: {channels.height} channels; most active:")
        print(channels.select("channel", "max_activation", "max_frequency").head(5))
        # the most active channel that has dreams (dreams are made for chosen channels only), else the most active
        ranked = [int(c) for c in channels["channel"]]
        channel = next((c for c in ranked if results.dreams(variant, c).height), ranked[0])
        print(f"-- channel {channel}: top examples")
        print(results.examples(variant, channel).select("rank", "prompt", "timestep", "activation"))
        priors, dreams = results.priors(variant, channel), results.dreams(variant, channel)
        print(f"-- channel {channel}: {priors.height} priors, {dreams.height} dreams")
        finished = dreams.filter(~pl.col("failed"))
        if finished.height:
            print(finished.select("timestep", "seed", "final_activation"))
            if args.save:
                image = results.image(finished["image"][0])
                image.save(args.save)
                print(f"saved {image.size[0]}x{image.size[1]} dream image to {args.save}")
                args.save = None  # the first variant's only

if __name__ == "__main__":
    main()
