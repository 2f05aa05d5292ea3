"""`minisft export SOURCE DIR`: a training checkpoint -> a Hugging Face folder that
transformers.AutoModelForCausalLM.from_pretrained(DIR) loads: GPT-2's (the tokenizer is GPT-2's own)
or a Llama-family model's, with the tokenizer files of the folder its run started from.

A LoRA run's checkpoint (or an adapter folder) exports its adapter in PEFT's layout
(adapter_config.json + adapter_model.safetensors, for peft.PeftModel.from_pretrained); with --merge
the adapter is folded into the base weights and DIR is an ordinary HF folder."""
from pathlib import Path

from .. import lora, tokenizer
from ..checkpoint import load_checkpoint
from ..config import GPTConfig
from ..errors import MinisftError
from ..model import GPT
from ..pretrained import save_pretrained
from .checks import output_dir
from .model_args import model_folder


def run(args) -> int:
    output_dir(args.dir, "DIR")
    src = Path(args.checkpoint)
    base = None  # an adapter folder's base: where its tokenizer is
    if src.is_dir() or lora.is_checkpoint(src):
        if src.is_dir():
            base = args.weights or lora.recorded_base(src, lora.base_of_adapter(src))
            model = GPT.from_pretrained(base, dtype="float32", model=args.model)
            lora.load_adapter(model, src)
        else:
            model = lora.model_from_checkpoint(src, dtype="float32", weights=args.weights)
        if not args.merge:
            out = lora.save_adapter(model, args.dir)
            print(f"exported the adapter of {src} -> {out}/{lora.CONFIG_FILE} + {lora.WEIGHTS_FILE} "
                  f"({lora.trainable_parameters(model)})")
            return 0
        model = lora.merge(model)
    elif args.merge:
        raise MinisftError(f"--merge: {src} is a full fine-tuning checkpoint, it has no adapter to merge")
    else:
        # Hugging Face GPT-2 weights are float32: a float64 checkpoint is rounded once, here.
        model, _, _ = load_checkpoint(src, dtype="float32", load_optimizer=False)
    out = save_pretrained(model, args.dir)
    folder = Path(base) if base is not None and Path(base).is_dir() else model_folder(args, model)
    if not isinstance(model.cfg, GPTConfig):  # GPT-2's tokenizer is every reader's own
        if folder is not None and (folder / "tokenizer.json").is_file():
            tokenizer.for_model(model.cfg, folder).save(out)
        else:
            print(f"note: {folder or 'the source'} has no tokenizer.json to copy; add the model's tokenizer files "
                  f"to {out} before generating from it")
    head = f"tied to {model.family.embed}" if model.cfg.tie_embeddings else "untied (lm_head.weight)"
    print(f"exported {src}{' merged' if args.merge else ''} -> {out}/config.json + model.safetensors "
          f"({model.num_params():,} parameters, float32, head {head})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder "
                                      "(config.json + model.safetensors), or a LoRA adapter in PEFT's layout",
                       description=__doc__)
    p.add_argument("checkpoint", metavar="SOURCE", help="a minisft training checkpoint (.h5) or a LoRA adapter folder")
    p.add_argument("dir", metavar="DIR", help="output folder (created; the files it writes are replaced)")
    p.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the weights: an ordinary HF folder")
    p.add_argument("--weights", help="the LoRA base model (default: the path the checkpoint or adapter records)")
    p.add_argument("--model", help="the base's shape preset, for a bare .safetensors base file")
    p.set_defaults(func=run)
