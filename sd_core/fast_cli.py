"""The command line's fast path: generate's and dit's flags (sd_core.__main__ registers them), which of them a
command line gives, and the fast pipeline they ask for. Each flag turns the fast path on and is a field of the
settings record (sd_core.fast.options.asked_by reads them back), except --compile and --freeze, which say how."""
import argparse

FAST_FLAGS = ("fast", "deepcache", "dit_cache", "compile", "freeze", "guidance_until", "tgate")


def fast_flags(args: argparse.Namespace) -> list[str]:
    """The fast-path flags given on the command line (generate's or dit's)."""
    return [f"--{name.replace('_', '-')}" for name in FAST_FLAGS if getattr(args, name, None)]


def run_fast(pipe, settings, args: argparse.Namespace):
    """The fast pipeline over `pipe` with the options `settings` asks for and the command line's compile flags."""
    from sd_core.fast.pipeline import fast_for  # the fast path loads only when a command takes it
    return fast_for(pipe, settings, compile=args.compile or args.freeze, freeze=args.freeze)


def fast_arguments(g, dit: bool = False):
    """The fast path's flags: generate's (the UNet's DeepCache and T-GATE) or, with `dit`, dit's (FORA)."""
    model = "the transformer" if dit else "the UNet"
    g.add_argument("--fast", action="store_true", help="the fast path: channels-last, bf16 where the hardware has "
                   "it; images close to, not equal to, the parity path's")
    if dit:
        g.add_argument("--dit-cache", type=int, default=0, metavar="N", help="fast path: FORA, recompute the "
                       "transformer's blocks every N steps and reuse their outputs between (2-3)")
    else:
        g.add_argument("--deepcache", type=int, default=0, metavar="N",
                       help="fast path: run the whole UNet every N steps, reuse its deep features between (2-3)")
        g.add_argument("--tgate", type=float, metavar="SHARE", help="fast path: T-GATE, freeze cross-attention "
                       "(and stop guidance) after this share of the noise schedule (e.g. 0.5)")
    g.add_argument("--guidance-until", type=float, metavar="SHARE", help="fast path: guide only this share of the "
                   "noise schedule (e.g. 0.7), the conditional pass alone after it")
    g.add_argument("--compile", action="store_true", help=f"fast path: torch.compile {model} (slow first run)")
    g.add_argument("--freeze", action="store_true", help="fast path: --compile with inductor's weight freezing "
                   "(weights folded in and prepacked; the slowest first run, the fastest after)")
