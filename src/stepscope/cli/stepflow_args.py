"""StepFlow command-line flags, shared by generate, diagnose, eval and analyze."""

from __future__ import annotations

import argparse

from ..defaults import ALPHA, TAU_MAX
from ..errors import StepscopeError


def add_stepflow_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("StepFlow (test-time repair)")
    g.add_argument("--stepflow", action="store_true", help="turn StepFlow on (OEB + SMI with the paper's defaults)")
    g.add_argument("--oeb-layers", default=None, help="OEB layers, e.g. 0-7 (default: bottom quarter)")
    g.add_argument("--smi-layers", default=None, help="SMI layers, e.g. 22-29 (default: top quarter)")
    g.add_argument("--tau-max", type=float, default=None,
                   help=f"OEB bridge mass target (default: the calibrated value from --bands, else {TAU_MAX:g})")
    g.add_argument("--alpha", type=float, default=None,
                   help=f"SMI strength (default: the calibrated value from --bands, else {ALPHA:g})")
    g.add_argument("--smi-window", type=int, default=None,
                   help="average only the last W tokens of the finished step (default: the whole step)")
    g.add_argument("--smi-at-summary", action="store_true", help="also inject at the first summary token")
    g.add_argument("--no-oeb", action="store_true", help="StepFlow without OEB (ablation)")
    g.add_argument("--no-smi", action="store_true", help="StepFlow without SMI (ablation)")
    g.add_argument("--bands", default=None, metavar="FILE",
                   help="layer bands (and strengths, if calibrated) from `stepscope calibrate`'s bands.json; "
                   "--oeb-layers / --smi-layers given as well take precedence")


def stepflow_from_args(args, model=None, force: bool = False):
    """A StepFlowConfig when --stepflow (or ``force``) is given; prints the resolved layer bands."""
    from ..stepflow import StepFlowConfig, parse_layers

    touched = any(getattr(args, k, None) for k in ("oeb_layers", "smi_layers", "smi_window", "no_oeb", "no_smi",
                                                   "smi_at_summary", "bands"))
    if not (args.stepflow or force):
        if touched:
            raise StepscopeError("StepFlow options were given without --stepflow; add --stepflow to turn it on")
        return None
    if args.no_oeb and args.no_smi:
        raise StepscopeError("--no-oeb and --no-smi together leave nothing of StepFlow; drop --stepflow instead")
    oeb_layers, smi_layers = parse_layers(args.oeb_layers), parse_layers(args.smi_layers)
    tau_max, alpha = args.tau_max, args.alpha
    bands_path = getattr(args, "bands", None)
    if bands_path:
        from ..calibrate import load_bands

        bands = load_bands(bands_path)
        if model is not None and bands.num_layers != model.config.num_hidden_layers:
            raise StepscopeError(f"{bands_path} was calibrated for {bands.num_layers} layers, but the model has "
                                 f"{model.config.num_hidden_layers}; calibrate this model")
        oeb_layers = oeb_layers if oeb_layers is not None else bands.oeb_layers
        smi_layers = smi_layers if smi_layers is not None else bands.smi_layers
        tau_max = tau_max if tau_max is not None else bands.tau_max  # a flag given by hand wins
        alpha = alpha if alpha is not None else bands.alpha
    strengths = {k: v for k, v in (("tau_max", tau_max), ("alpha", alpha)) if v is not None}
    cfg = StepFlowConfig(oeb=not args.no_oeb, oeb_layers=oeb_layers, smi=not args.no_smi, smi_layers=smi_layers,
                         smi_window=args.smi_window, smi_at_summary=args.smi_at_summary, **strengths)
    if model is not None:
        from ..windows import layer_windows

        print(cfg.resolve(model.config.num_hidden_layers, layer_windows(model.config)).describe())
    return cfg
