"""Instruction-tune a causal LM with PEDRO (arXiv 2409.17834) through transformers ``Trainer``, offline.

Loss on the answer only: labels are -100 on the prompt, which is also how PEDRO finds the prompt it pools.

    python examples/train_pedro.py                       # SmolLM2-135M-Instruct on chatterbot-corpus pairs
    python examples/train_pedro.py --tiny                # tiny random Llama, synthetic pairs, seconds
    python examples/train_pedro.py --baseline ia3        # same run with peft IA3 for comparison
    accelerate launch --multi_gpu --num_processes 2 examples/train_pedro.py --tiny   # DDP: 2 processes (gloo on a CPU-only machine)
"""

from common import base_parser, baseline_config, causal_setup, train


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0], default_lr=3e-3, default_steps=10)
    parser.set_defaults(batch_size=4, max_length=80, n_eval=48)
    parser.add_argument("--vg-rank", type=int, default=12, help="bottleneck of the vector generator")
    parser.add_argument(
        "--pooler",
        choices=["attention", "mean", "last"],
        default="attention",
        help="how the prompt's hidden states are pooled into one vector per layer",
    )
    args = parser.parse_args(argv)
    model, train_ds, eval_ds, _ = causal_setup(args)
    if args.baseline:
        config, name = baseline_config(args.baseline, "CAUSAL_LM"), args.baseline
    else:
        from xpeft import PedroConfig

        config = PedroConfig(task_type="CAUSAL_LM", vg_rank=args.vg_rank, pooler=args.pooler)
        name = "pedro"
    return train(args, model, config, train_ds, eval_ds, name, classification=False)


if __name__ == "__main__":
    main()
