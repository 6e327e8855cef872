#!/usr/bin/env python
"""DP fine-tuning on several processes (DDP) with ``accelerate launch``: a copyable starting point.

Every process runs this same script. ``DPTrainer`` draws ONE Poisson batch (rate q = B / N) per optimizer
step from a seed shared by all ranks, deals it to the ranks, clips per example on each rank, all-reduces
the clipped sums once, adds the Gaussian noise exactly once (rank 0) and divides by the public expected
batch size B; the privacy accountant sees the global q and the global step count. ``--batch-size`` is
therefore the GLOBAL expected batch: this script splits it into ``micro-batch x accumulation x processes``.

Examples (offline; ``--smoke`` = a tiny random BERT on built-in sentences, seconds):
    # 2 CPU processes (gloo). `--cpu` without `--multi_gpu` would silently start ONE process.
    CUDA_VISIBLE_DEVICES="" accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no examples/accelerate/dp_finetune.py --smoke --output-dir /tmp/dp-ddp
    # the same from the config file
    accelerate launch --config_file examples/accelerate/cpu_2proc.yaml examples/accelerate/dp_finetune.py --smoke
    # 8 GPUs on one machine: all-MiniLM-L6-v2 + LoRA on offline Rotten Tomatoes, certified epsilon 3
    accelerate launch --config_file examples/accelerate/one_machine_multi_gpu.yaml --num_processes 8 \\
        examples/accelerate/dp_finetune.py --target-epsilon 3 --batch-size 1024 --micro-batch-size 32
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/dp-ddp")
    p.add_argument("--model", default=None, help="local folder or Hub id (default: offline all-MiniLM-L6-v2)")
    p.add_argument("--smoke", action="store_true", help="tiny random BERT and built-in sentences (seconds)")
    p.add_argument("--target-epsilon", type=float, default=3.0, help="certified epsilon budget")
    p.add_argument("--noise-multiplier", type=float, default=None, help="fixed sigma instead of calibrating")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL expected logical batch, q = B / N (default 256; 32 with --smoke)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-process physical batch (default 32; 8 with --smoke)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--noise-seed", type=int, default=None,
                   help="fixed seed for noise and sampling: reproducible, NOT private (tests only)")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from (keeps the spent budget)")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 32 if args.smoke else 256
    if args.micro_batch_size is None:
        args.micro_batch_size = 8 if args.smoke else 32
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from hf_ewtune import DPTrainer

    use_cpu = not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu)  # joins the process group set up by `accelerate launch`
    world = state.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world != launched:
        raise SystemExit(f"the launcher started {launched} processes but only {world} joined the process group")

    # --- data and tokenizer: built on the main process first, then read by the others (identical everywhere)
    tok_dir = os.path.join(args.output_dir, "tokenizer")
    with state.main_process_first():
        if args.smoke:
            from datasets import Dataset, DatasetDict

            from hf_ewtune.testing import SAMPLE_LABELS, SAMPLE_TEXTS, tiny_bert, tiny_tokenizer

            if state.is_main_process and not os.path.isdir(tok_dir):
                tiny_tokenizer().save_pretrained(tok_dir)  # trained in code: build once, share the files
            texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(256)]
            labels = [SAMPLE_LABELS[i % len(SAMPLE_LABELS)] for i in range(256)]
            data = DatasetDict({"train": Dataset.from_dict({"text": texts, "label": labels}),
                                "test": Dataset.from_dict({"text": texts[:32], "label": labels[:32]})})
        else:
            from hf_ewtune.data import load_rotten_tomatoes, minilm_path

            data = load_rotten_tomatoes()
            src = args.model or minilm_path()
            if state.is_main_process and not os.path.isdir(tok_dir):
                AutoTokenizer.from_pretrained(src).save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
                    batched=True, remove_columns=["text"])
    data = data.rename_column("label", "labels")

    # --- model (DDP broadcasts rank 0's initial weights, so random heads/adapters agree)
    if args.smoke:
        model = tiny_bert(vocab_size=len(tokenizer))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.model or minilm_path(), num_labels=2)
    if not args.no_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["query", "value"]))

    # --- the global expected batch B = micro x GA x world
    per_step = args.micro_batch_size * world
    if args.batch_size % per_step:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size x processes "
                         f"= {args.micro_batch_size} x {world}")
    training_args = TrainingArguments(
        output_dir=args.output_dir, use_cpu=use_cpu, report_to="none", seed=0,
        per_device_train_batch_size=args.micro_batch_size, per_device_eval_batch_size=64,
        gradient_accumulation_steps=args.batch_size // per_step,
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=10,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    dp = dict(target_epsilon=args.target_epsilon, max_grad_norm=args.max_grad_norm, noise_seed=args.noise_seed)
    if args.noise_multiplier is not None:
        dp["noise_multiplier"] = args.noise_multiplier
    trainer = DPTrainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["test"],
                        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), **dp)
    assert trainer.args.world_size == world, (trainer.args.world_size, world)
    trainer.train(resume_from_checkpoint=args.resume)
    metrics = trainer.evaluate()
    trainer.save_model()
    report = trainer.get_privacy_spent()
    if state.is_main_process:
        print(f"processes: {world}; sample rate q = {trainer.sample_rate:.4g} (global B = {trainer.expected_batch_size}, "
              f"N = {trainer.num_train_examples}); noise multiplier = {trainer.noise_multiplier:.4g}")
        print(f"steps: {report.steps}; certified epsilon = {report.epsilon:.4g} at delta = {trainer.delta:.3g}")
        edgeworth = getattr(report, "edgeworth_epsilon", None)
        if edgeworth is not None:
            print(f"Edgeworth epsilon = {edgeworth:.4g} (estimate, not a guarantee)")
        print(f"eval loss = {metrics.get('eval_loss', float('nan')):.4f}; saved to {args.output_dir}")
    state.wait_for_everyone()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # a gloo group left alive can abort a rank at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
