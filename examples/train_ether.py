"""Fine-tune a classifier with ETHER / ETHER+ (arXiv 2405.20271) through transformers ``Trainer``, offline.

python examples/train_ether.py                       # all-MiniLM-L6-v2 on SpamAssassin (assets: xpeft.datasets)
python examples/train_ether.py --variant ether_plus --lr 1e-2
python examples/train_ether.py --tiny                # tiny random BERT, synthetic data, seconds
python examples/train_ether.py --baseline lora       # same run with peft LoRA r=8 for comparison
accelerate launch --multi_gpu --num_processes 2 examples/train_ether.py --tiny   # DDP: 2 processes (gloo on a CPU-only machine)
"""

from common import base_parser, baseline_config, classification_setup, train


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0], default_lr=1e-2, default_steps=30)
    parser.add_argument(
        "--variant",
        choices=["ether", "ether_plus", "ether_plus_one_sided"],
        default="ether",
        help="ETHER: one Householder reflection per block; ETHER+: two-sided, relaxed (see docs/ether.md)",
    )
    parser.add_argument("--n-blocks", type=int, default=None, help="diagonal blocks (default: 32, 4 with --tiny)")
    parser.add_argument("--targets", nargs="+", default=["query", "value"], help="modules to adapt")
    args = parser.parse_args(argv)
    model, train_ds, eval_ds = classification_setup(args)
    if args.baseline:
        config, name = baseline_config(args.baseline, "SEQ_CLS"), args.baseline
    else:
        from xpeft import EtherConfig

        n_blocks = args.n_blocks or (4 if args.tiny else 32)
        config = EtherConfig(task_type="SEQ_CLS", target_modules=args.targets, n_blocks=n_blocks, variant=args.variant)
        name = args.variant
    return train(args, model, config, train_ds, eval_ds, name, classification=True)


if __name__ == "__main__":
    main()
