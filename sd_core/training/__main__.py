"""python -m sd_core.training: train and evaluate the embedded models (the recipes: sd_core.training.recipes and,
for the ControlNet, sd_core.training.controlnet)."""
import argparse
import json
from pathlib import Path

from sd_core.training import controlnet, recipes
from sd_core.training.loop import Run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sd_core.training", description=recipes.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, steps, batch, lr in (("vae", 2500, 16, 1e-3), ("vae-decoder", 2500, 32, 5e-4),
                                   ("text-to-image", 9000, 32, 5e-4), ("dit", 3500, 32, 1e-3),
                                   ("controlnet", 2000, 32, 5e-4)):
        p = commands.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--save-every", type=int, default=250)
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
        p.add_argument("--stop-at", type=int, help="checkpoint and stop after this step (resume later)")
        p.add_argument("--gradient-accumulation-steps", type=int, default=1,
                       help="micro-batches per process per step: less memory, the same training")
        p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                       help="autocast precision (default: accelerate launch's --mixed_precision, else no)")
        if name == "controlnet":
            p.add_argument("--model", type=Path, required=True, help="the text-to-image model folder it steers")
        elif name != "vae":
            p.add_argument("--vae", type=Path, required=True, help="a trained VAE run's model folder")
    e = commands.add_parser("evaluate")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--dit", type=Path)
    e.add_argument("--seeds", type=int, default=4)
    e.add_argument("--grid", type=Path)
    e.add_argument("--json", type=Path)
    e.add_argument("--limit", type=int, help="only the first N held-out prompts and DiT classes (a quick check)")
    controlnet.add_evaluate_command(commands)
    args = parser.parse_args(argv)
    if args.command == "evaluate-controlnet":
        return controlnet.run_evaluate_command(args)
    if args.command == "evaluate":
        report = recipes.evaluate(args.model, args.dit, args.seeds, args.grid, args.limit)
        if report is not None:  # the main process
            recipes.print_report(report)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
        return
    run = Run(args.out, args.steps, args.batch, args.lr, args.seed, args.save_every, threads=args.threads,
              stop_at=args.stop_at, gradient_accumulation_steps=args.gradient_accumulation_steps,
              mixed_precision=args.mixed_precision)
    if args.command == "vae":
        recipes.train_vae(run)
    elif args.command == "vae-decoder":
        recipes.train_vae_decoder(run, args.vae)
    elif args.command == "text-to-image":
        recipes.train_text_to_image(run, args.vae)
    elif args.command == "controlnet":
        controlnet.train_controlnet(run, args.model)
    else:
        recipes.train_dit(run, args.vae)


if __name__ == "__main__":
    raise SystemExit(main())
