"""`minisft export CHECKPOINT DIR`: a training checkpoint -> a Hugging Face GPT-2 folder that
transformers.GPT2LMHeadModel.from_pretrained(DIR) loads (the tokenizer is GPT-2's own)."""
from ..checkpoint import load_checkpoint
from ..pretrained import save_pretrained
from .checks import output_dir


def run(args) -> int:
    output_dir(args.dir, "DIR")
    # Hugging Face GPT-2 weights are float32: a float64 checkpoint is rounded once, here.
    model, _, _ = load_checkpoint(args.checkpoint, dtype="float32", load_optimizer=False)
    out = save_pretrained(model, args.dir)
    head = "tied to wte" if model.cfg.tie_embeddings else "untied (lm_head.weight)"
    print(f"exported {args.checkpoint} -> {out}/config.json + model.safetensors "
          f"({model.num_params():,} parameters, float32, head {head})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 folder "
                                      "(config.json + model.safetensors)", description=__doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a minisft training checkpoint (.h5)")
    p.add_argument("dir", metavar="DIR", help="output folder (created; its config.json and "
                                              "model.safetensors are replaced)")
    p.set_defaults(func=run)
