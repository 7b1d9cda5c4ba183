"""Generate with a checkpoint of train.py --task generate: text -> image (PNG files), image -> text.

    python generate.py runs/demo_generate/checkpoint-3000 --prompt "a handwritten digit 7" \
        --num_images 8
    python generate.py runs/demo_generate/checkpoint-3000 --image demo_data/digits/images/00007.png

Images: Euler integration of the predicted velocity from t = 1 (noise) to t = 0 in --steps
steps, with classifier-free guidance --cfg_scale (1: none). Text: greedy decoding until the
end-of-text token.
"""
import argparse
import os
import re
import sys

import torch

from checkpoint import resolve_resume
from config import given_flags
from dataset import DataError
from files import OutputError, reason, write_file
from tasks.generate.model import SPEC_FILE, load_unified
from tasks.generate.patches import load_image
from tasks.generate.sampling import generate_images, generate_text, sampling_shift
from tasks.images import save_grid, to_pil


IMAGE_FLAGS = ("num_images", "steps", "cfg_scale", "seed", "timestep_shift", "out_dir")
TEXT_FLAGS = ("max_new_tokens",)  # what only text -> image (--prompt), image -> text (--image) read


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a checkpoint-* folder of a generation run, or the run folder (its newest)")
    p.add_argument("--prompt", action="append", default=[],
                   help="text -> image; may be given several times")
    p.add_argument("--image", action="append", default=[],
                   help="image -> text; may be given several times")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default: 50)")
    p.add_argument("--cfg_scale", type=float, default=4.0,
                   help="classifier-free guidance scale, 1 = none (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--timestep_shift", type=float,
                   help="shift of the Euler steps' times (default: the one the checkpoint was "
                        "trained with)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="longest caption (default: 32)")
    p.add_argument("--out_dir", default="generated",
                   help="where PNG files go (default: generated/)")
    args = p.parse_args(argv)
    if not args.prompt and not args.image:
        p.error("give --prompt (text -> image) and/or --image (image -> text)")
    given = given_flags(args, p)  # a flag typed that cannot act is an error
    for flags, needs in ((IMAGE_FLAGS, "prompt"), (TEXT_FLAGS, "image")):
        inert = [f"--{name}" for name in flags if name in given]
        if inert and not getattr(args, needs):
            p.error(f"{', '.join(inert)}: no effect without --{needs}")
    folder = args.checkpoint
    if not os.path.isfile(os.path.join(folder, SPEC_FILE)):
        try:
            folder = resolve_resume("latest", folder)
        except FileNotFoundError:
            p.error(
                f"{args.checkpoint}: not a generation checkpoint ({SPEC_FILE} is missing) nor a "
                "run folder"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, info = load_unified(folder)
    model.to(device)

    if args.prompt:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:  # a user error: one line, exit code 2
            print(f"error: --out_dir {args.out_dir}: cannot create it ({reason(e)})",
                  file=sys.stderr)
            sys.exit(2)
        prompts = [prompt for prompt in args.prompt for _ in range(args.num_images)]
        shift = sampling_shift(info, args.timestep_shift)
        cfg_scale = guidance_scale(info, args.cfg_scale, "cfg_scale" in given)
        images = generate_images(model, tokenizer, prompts, args.steps, cfg_scale, args.seed,
                                 shift, device)
        try:
            slugs = set()
            for k, prompt in enumerate(args.prompt):
                slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60] or "prompt"
                if slug in slugs:  # a prompt again, or one that differs past 60 characters or
                    slug = f"{slug}-{k + 1}"  # in punctuation: its images must not overwrite
                slugs.add(slug)
                for i in range(args.num_images):
                    image = to_pil(images[k * args.num_images + i])
                    write_file(os.path.join(args.out_dir, f"{slug}_{i}.png"),
                               lambda tmp: image.save(tmp, format="PNG"), "--out_dir")
                print(
                    f"{prompt!r}: {args.num_images} image(s) -> "
                    f"{os.path.join(args.out_dir, slug)}_*.png"
                )
            save_grid(images, os.path.join(args.out_dir, "grid.png"), args.num_images)
        except OutputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    for path in args.image:
        try:
            image = load_image(path, model.spec)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        caption = generate_text(model, tokenizer, [image], max_new_tokens=args.max_new_tokens,
                                device=device)[0]
        print(f"{path}: {caption}")


def guidance_scale(info, cfg_scale, given):
    """Guidance extrapolates from the unconditional prediction, which a checkpoint trained with
    --cond_dropout 0 never learned: there the default scale gives way to 1 (no guidance), and a
    scale given is kept; either is said."""
    if info.get("cond_dropout") != 0 or cfg_scale == 1:
        return cfg_scale
    why = ("the checkpoint was trained with --cond_dropout 0, so the unconditional prediction "
           "that guidance extrapolates from was never trained")
    if given:
        print(f"note: --cfg_scale {cfg_scale:g}: {why}")
        return cfg_scale
    print(f"note: sampling without guidance (--cfg_scale 1, not the default {cfg_scale:g}): "
          f"{why}; give --cfg_scale to guide anyway")
    return 1.0


if __name__ == "__main__":
    main()
