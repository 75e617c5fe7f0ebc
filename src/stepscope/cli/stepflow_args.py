"""StepFlow command-line flags, shared by generate, diagnose, eval and analyze."""

from __future__ import annotations

import argparse

from ..errors import StepscopeError


def add_stepflow_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("StepFlow (test-time repair)")
    g.add_argument("--stepflow", action="store_true", help="turn StepFlow on (OEB + SMI with the paper's defaults)")
    g.add_argument("--oeb-layers", default=None, help="OEB layers, e.g. 0-7 (default: bottom quarter)")
    g.add_argument("--smi-layers", default=None, help="SMI layers, e.g. 22-29 (default: top quarter)")
    g.add_argument("--tau-max", type=float, default=0.15, help="OEB bridge mass target (default 0.15)")
    g.add_argument("--alpha", type=float, default=0.06, help="SMI strength (default 0.06)")
    g.add_argument("--smi-window", type=int, default=None,
                   help="average only the last W tokens of the finished step (default: the whole step)")
    g.add_argument("--smi-at-summary", action="store_true", help="also inject at the first summary token")
    g.add_argument("--no-oeb", action="store_true", help="StepFlow without OEB (ablation)")
    g.add_argument("--no-smi", action="store_true", help="StepFlow without SMI (ablation)")


def stepflow_from_args(args, model=None, force: bool = False):
    """A StepFlowConfig when --stepflow (or ``force``) is given; prints the resolved layer bands."""
    from ..stepflow import StepFlowConfig, parse_layers

    touched = any(getattr(args, k) for k in ("oeb_layers", "smi_layers", "smi_window", "no_oeb", "no_smi",
                                             "smi_at_summary"))
    if not (args.stepflow or force):
        if touched:
            raise StepscopeError("StepFlow options were given without --stepflow; add --stepflow to turn it on")
        return None
    if args.no_oeb and args.no_smi:
        raise StepscopeError("--no-oeb and --no-smi together leave nothing of StepFlow; drop --stepflow instead")
    cfg = StepFlowConfig(oeb=not args.no_oeb, oeb_layers=parse_layers(args.oeb_layers), tau_max=args.tau_max,
                         smi=not args.no_smi, smi_layers=parse_layers(args.smi_layers), alpha=args.alpha,
                         smi_window=args.smi_window, smi_at_summary=args.smi_at_summary)
    if model is not None:
        print(cfg.resolve(model.config.num_hidden_layers).describe())
    return cfg
