"""``bcellmap simulate``: write the simulated demo cohort."""

from __future__ import annotations

import argparse


def cli_simulate(args: argparse.Namespace) -> None:
    """``bcellmap simulate --out DIR [--preset P] [--seed S] [--events N] [--no-drift]
    [--no-lymphopenic] [--no-scrna] [--threads N]``."""
    from ..demo.simulate import simulate_cohort

    sheet = simulate_cohort(args.out, preset=args.preset, seed=args.seed, scrna=not args.no_scrna,
                            events_per_file=args.events,
                            drift=not getattr(args, "no_drift", False),
                            lymphopenic=not getattr(args, "no_lymphopenic", False),
                            workers=getattr(args, "threads", 1))
    print(f"{sheet}: demo cohort written")
