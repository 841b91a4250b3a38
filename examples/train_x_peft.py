"""Train an X-PEFT profile (arXiv 2401.16137): only the masks over a frozen adapter bank, with transformers ``Trainer``.

python examples/train_x_peft.py                      # all-MiniLM-L6-v2 on SpamAssassin, random bank, soft masks
python examples/train_x_peft.py --mask-type hard --hard-k 4
python examples/train_x_peft.py --bank path/to/bank.safetensors   # a bank built from trained adapters
python examples/train_x_peft.py --tiny               # tiny random BERT, synthetic data, seconds
accelerate launch --multi_gpu --num_processes 2 examples/train_x_peft.py --tiny   # DDP: 2 processes (gloo on a CPU-only machine)
"""

from common import base_parser, baseline_config, classification_setup, train


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0], default_lr=1e-2, default_steps=30)
    parser.add_argument(
        "--mask-type",
        choices=["soft", "hard"],
        default="soft",
        help="soft: a weighted mix of the whole bank; hard: the top-k adapters per layer",
    )
    parser.add_argument("--hard-k", type=int, default=1, help="adapters selected per layer (hard masks)")
    parser.add_argument(
        "--bank-size", type=int, default=None, help="adapters in the bank (default 100, 8 with --tiny)"
    )
    parser.add_argument(
        "--reduction-factor", type=int, default=16, help="bottleneck width of a random bank = hidden / factor"
    )
    parser.add_argument("--bank", default="random", help="'random' or the path of a saved bank")
    args = parser.parse_args(argv)
    model, train_ds, eval_ds = classification_setup(args)
    if args.baseline:
        config, name = baseline_config(args.baseline, "SEQ_CLS"), args.baseline
    else:
        from xpeft import XPeftConfig

        bank_size = args.bank_size or (8 if args.tiny else 100)
        config = XPeftConfig(
            task_type="SEQ_CLS", bank_size=bank_size, reduction_factor=args.reduction_factor,
            mask_type=args.mask_type, hard_k=args.hard_k, bank=args.bank,
        )  # fmt: skip
        name = f"x_peft_{args.mask_type}"
    return train(args, model, config, train_ds, eval_ds, name, classification=True)


if __name__ == "__main__":
    main()
