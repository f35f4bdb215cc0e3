"""Training and evaluation scripts of the bundled model organisms (one module per organism)."""

from __future__ import annotations

import argparse


def preset_command_line(
    argv: list[str] | None, *, prog: str, description: str, presets: dict, out_help: str, example: str
) -> tuple[argparse.Namespace, dict]:
    """The command line the small trainers share: ``--out --preset --device --seed --max-minutes --max-steps --lr
    --set KEY=VALUE --threads``. Returns the arguments and the run's parameters: the preset, then the flags given,
    then each ``--set`` (a key of the preset, converted to its type; an unknown key is a usage error, exit 2).
    Torch's CPU threads are set here (default 1: the machine is shared)."""
    import torch

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--preset", choices=tuple(presets), default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", dest="max_minutes", type=float, default=None, help="wall-clock cap of the loop")
    ap.add_argument("--max-steps", dest="max_steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a preset value, e.g. --set {example} (keys: {', '.join(presets['cpu'])})",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = dict(presets[args.preset], preset=args.preset, device=args.device, seed=args.seed)
    for key in ("max_minutes", "max_steps", "lr"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in presets["cpu"]:
            ap.error(f"unknown preset key {key!r}")
        p[key] = type(presets["cpu"][key])(value)
    return args, p


def llama_config(tok, p: dict, *, n_kv_heads: int, max_positions: int, tied: bool):
    """The small Llama every trainer builds: sizes from the parameters ``p`` (``d_model``, ``d_ff``, ``n_layers``,
    ``n_heads``), special tokens from ``tok``, RoPE base 10,000, SiLU, no biases; the rest is the trainer's."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=p["d_model"],
        intermediate_size=p["d_ff"],
        num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"],
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
    )
