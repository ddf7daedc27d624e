"""OPCD step throughput, ours against TRL's on-policy distillation trainers, side by side in one run: the same
tiny Qwen3-VL, the same rows, batch, micro-batch, response length, dtype (fp32), threads and steps.

Rows (--backends, --peers):
- ours, hf / vllm: opcd.opcd_step with --rollout hf (batched generate) or vllm (in-process engine), the exact
  reverse KL (--loss full), the frozen teacher reading our privileged prompt (the state as text, the reference plan);
- ours, served: HF rollouts, the teacher behind a `vllm serve` of the same model that this bench starts
  (--teacher-url, --loss topk --topk 20: a served teacher returns top-k log-probs, not the full vocabulary);
- ours, hf, before: the hf row as the step was before its micro-batches were grouped by length (consecutive rows,
  as they come: every forward padded to the longest of any four prompts);
- ours, hf, teacher on the student's prompt (hf-student-prompt): the hf row with the teacher reading the student's
  own picture prompt (--teacher-context image), as DistillationTrainer's does: both sides do the same work, which the ratio of this row
  to that peer measures;
- ours, hf, text prompts (hf-text): the hf row with the student reading the state as text, not the picture (--text-share 1),
  as SDFTTrainer's student does: the same work as that peer;
- TRL DistillationTrainer (hf / vllm colocated; beta 1: the reverse KL over the full vocabulary, on-policy), on the
  same VLM rows (the picture and our student prompt). Its teacher reads the student's own prompt: TRL has no
  privileged-context input, so its teacher forward is over a shorter prompt than ours;
- TRL SDFTTrainer (hf; the privileged teacher of self-distillation, distillation_mode full_logits, alpha 1: the
  reverse KL), its teacher a frozen copy of the student ("base") reading the student's prompt followed by our
  teacher's privileged context (the state as text, the reference plan). SDFT takes text prompts only (no image
  column), so its student reads our text prompt (the state as text), as ours does in the hf-text row.
The peers' models run HF's own SDPA attention, as from_pretrained gives it; ours, on CPU, common.sdpa_shared_kv (the
same attention without HF's copies of the key/value heads).
Each row: one warm-up step, then --steps measured steps; the table gives the medians of the seconds per phase
(a peer's rollout: its _generate; its teacher: the teacher's forwards; its train: the rest of the step), the seconds
a step (a peer's: the wall time from one optimiser step's end to the next, its data loading included), samples/s and
every row's samples/s as a ratio to ours. A second table counts the work (class Work): the decoder positions each
phase forwards, pads included, and the positions/s of the teacher and train phases, so that a ratio can be read as
more work or slower work. Gradient checkpointing is off on both sides unless --grad-checkpointing. TRL is not a
project dependency: pip install -r requirements-bench.txt; without it the peer rows are left out.

    OMP_NUM_THREADS=2 python bench/opcd_bench.py --size medium --batch-size 32 --max-new-tokens 128 --steps 5
    OMP_NUM_THREADS=1 python bench/opcd_bench.py --size tiny --batch-size 8 --max-new-tokens 16 --steps 5

On a CPU shared with other jobs use OMP_NUM_THREADS=1: with 2 OpenMP threads on 2 busy cores every small
decode-step matmul waits for a descheduled partner thread (HF generate ~6x slower).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import envs  # noqa: E402
import opcd  # noqa: E402
from mgsd import chat_api, common, optim, splits, tiny  # noqa: E402


OURS = {"hf": "ours, hf", "hf-student-prompt": "ours, hf, teacher on the student's prompt", "hf-text": "ours, hf, text prompts",
        "hf-before": "ours, hf, before", "vllm": "ours, vllm", "served": "ours, served"}  # --backends: the row's name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: build a tiny model of --size in a temp dir)")
    p.add_argument("--size", default="medium", choices=["tiny", "small", "medium"], help="size to build without --model")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward pass")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length cap (random models rarely stop)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per row, after one warm-up step")
    p.add_argument("--backends", default="hf,hf-student-prompt,hf-text,hf-before,vllm,served",
                   help="our rows: hf, vllm (rollout backends, in-process teacher), served (hf rollouts, the teacher "
                   "served by vllm serve), hf-student-prompt (hf, the teacher reading the student's picture prompt, as "
                   "DistillationTrainer's does), hf-text (hf, the student reading text prompts, as SDFTTrainer's does), "
                   "hf-before (hf, micro-batches of consecutive rows: the step before length grouping)")
    p.add_argument("--peers", default="distillation,distillation-vllm,sdft", help="TRL rows: distillation (HF "
                   "generate), distillation-vllm (colocated vLLM), sdft; '' for none")
    p.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing on both sides")
    args = p.parse_args(argv)
    unknown = sorted(set(args.backends.split(",")) - set(OURS) - {""})
    if unknown:
        p.error(f"--backends: unknown {', '.join(unknown)} (choose from {', '.join(OURS)})")
    return args


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


class Work:
    """Decoder positions (batch x length, pads included) forwarded per phase of a step, counted by hooks on the text
    decoders: the student's without gradients (the rollout), with gradients (the loss), the teacher's; and, for a peer,
    the seconds in its rollout (`trainer._generate`) and teacher forwards. Positions run in vLLM or a server are not
    seen (0). The same hooks count both sides, so positions/s compares how fast each side runs the same model."""

    def __init__(self, student, teacher=None):
        self.totals = dict(rollout=0, teacher=0, train=0, seconds_rollout=0.0, seconds_teacher=0.0)
        self.steps = []
        student.model.language_model.register_forward_pre_hook(
            lambda m, a, k: self.add("train" if torch.is_grad_enabled() else "rollout", k), with_kwargs=True)
        if teacher is not None and teacher is not student:
            teacher.model.language_model.register_forward_pre_hook(lambda m, a, k: self.add("teacher", k), with_kwargs=True)
            teacher.model.register_forward_pre_hook(lambda *a: setattr(self, "start", time.time()))
            teacher.model.register_forward_hook(lambda *a: self.add("seconds_teacher", time.time() - self.start))

    def add(self, key, value):
        self.totals[key] += value if isinstance(value, float) else value["inputs_embeds"].shape[:2].numel()

    def time_rollout(self, trainer):
        generate = trainer._generate

        def timed(*a, **k):
            start = time.time()
            out = generate(*a, **k)
            self.add("seconds_rollout", time.time() - start)
            return out
        trainer._generate = timed

    def end_step(self):
        self.steps.append(dict(self.totals))
        self.totals = dict.fromkeys(self.totals, 0)

    def medians(self):
        return {k: median([s[k] for s in self.steps]) for k in self.steps[0]}


def ours(backend, model_dir, rows, args, tmp):
    """Medians over --steps opcd steps (after one warm-up step) of the seconds per phase and samples/s."""
    model, processor = common.load_model(model_dir)
    served = common.start_server(model_dir, "teacher", max_logprobs=20) if backend == "served" else None
    extra = ["--teacher-url", served[1], "--loss", "topk", "--topk", "20"] if served else ["--loss", "full"]
    extra += {"hf-student-prompt": ["--teacher-context", "image"], "hf-text": ["--text-share", "1"]}.get(backend, [])
    o = opcd.parse_args(["--model", model_dir, "--teacher", "teacher" if served else model_dir, "--data", str(tmp / "train"),
                         "--out", str(tmp / "run"), "--rollout", "vllm" if backend == "vllm" else "hf", "--batch-size",
                         str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size), "--max-new-tokens",
                         str(args.max_new_tokens), "--max-model-len", "4096", *extra]
                        + ([] if args.grad_checkpointing else ["--no-grad-checkpointing"]))
    if args.grad_checkpointing:
        common.enable_checkpointing(model)  # as opcd.py does
    model.train()
    opt = optim.MasterAdamW(model.parameters(), o.lr, tuple(o.betas), o.weight_decay)
    teacher = chat_api.ServedTeacher(served[1], "teacher") if served else common.load_teacher(model_dir, processor, "cpu",
                                                                                             torch.float32)
    work = Work(model, None if served else teacher)
    llm = None
    if backend == "vllm":
        llm = common.make_llm(model_dir, max_model_len=4096, kv_cache_bytes=1 << 30)
        common.push_weights(llm, model)
    grouped = common.micro_batches
    if backend == "hf-before":
        common.micro_batches = lambda lengths, size: [list(range(i, min(i + size, len(lengths))))
                                                    for i in range(0, len(lengths), size)]
    logs = []
    try:
        for step in range(args.steps + 1):
            logs.append(opcd.opcd_step(o, step, common.batch_rows(rows, step, args.batch_size, 0, 0, 1), model, teacher,
                                       llm, processor, opt, 1, torch.device("cpu")))
            work.end_step()
    finally:
        common.micro_batches = grouped
        if llm is not None:
            common.close_llm(llm)
        if served:
            served[0].terminate()
            served[0].wait(timeout=60)
    out = {k: median([log[k] for log in logs[1:]]) for k in ("seconds_rollout", "seconds_teacher", "seconds_train",
                                                             "response_tokens")}
    work.steps = work.steps[1:]
    out |= {"positions_" + k: v for k, v in work.medians().items() if not k.startswith("seconds")}
    out["seconds_step"] = median([log["seconds_rollout"] + log["seconds_teacher"] + log["seconds_train"] for log in logs[1:]])
    return out


def peer(kind, model_dir, rows, args, tmp):
    """Medians over --steps steps (after one warm-up step) of TRL's DistillationTrainer or SDFTTrainer."""
    from datasets import Dataset
    from transformers import TrainerCallback

    class Timer(TrainerCallback):  # a step: from the previous step's end (the start of training) to this one's
        def __init__(self):
            self.seconds = []

        def on_train_begin(self, *a, **k):
            self.last = time.time()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.time() - self.last)
            self.last = time.time()
            work.end_step()

    model, processor = common.load_model(model_dir)
    model.set_attn_implementation("sdpa")  # HF's own attention, as a TRL user's from_pretrained gives it
    rows = (rows * (1 + (args.steps + 1) * args.batch_size // len(rows)))[:(args.steps + 1) * args.batch_size]
    common_config = dict(output_dir=str(tmp / kind), per_device_train_batch_size=args.micro_batch_size,
                         gradient_accumulation_steps=args.batch_size // args.micro_batch_size, max_steps=args.steps + 1,
                         learning_rate=1e-6, temperature=1.0,
                         max_completion_length=args.max_new_tokens, gradient_checkpointing=args.grad_checkpointing,
                         bf16=False, fp16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                         dataloader_num_workers=0, shuffle_dataset=False, disable_tqdm=True)
    timer = Timer()
    if kind.startswith("distillation"):
        from trl import DistillationConfig, DistillationTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": envs.student_prompt(r["state"])}],
                                   "image": common.load_image(r["image"])} for r in rows])
        teacher, _ = common.load_model(model_dir)
        teacher.set_attn_implementation("sdpa")
        vocab = model.config.get_text_config().vocab_size  # TRL bans the image token in HF generate only: ban ours in vLLM
        banned = set(common.unsampled_token_ids(processor, vocab))
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=4096, generation_kwargs={
            "allowed_token_ids": [i for i in range(vocab) if i not in banned]}) if kind.endswith("vllm") else {}
        config = DistillationConfig(beta=1.0, **vllm, **common_config)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=data,
                                      processing_class=processor, callbacks=[timer])
    else:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": envs.text_student_messages(r["state"])[0]
                                               ["content"][0]["text"]}],  # the state as text: SDFT reads no picture
                                   "privileged_context": envs.teacher_context(r["state"])} for r in rows])
        config = SDFTConfig(teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=1.0,
                            num_generations=1, **common_config)  # the teacher: "{prompt}\n\n{privileged_context}"
        trainer = SDFTTrainer(model=model, args=config, train_dataset=data, processing_class=processor.tokenizer,
                              callbacks=[timer])
    work = Work(model, trainer.teacher_model)
    work.time_rollout(trainer)
    trainer.train()
    work.steps = work.steps[1:]
    w = work.medians()
    step = median(timer.seconds[1:])
    return {"seconds_step": step, "seconds_rollout": w["seconds_rollout"], "seconds_teacher": w["seconds_teacher"],
            "seconds_train": step - w["seconds_rollout"] - w["seconds_teacher"]} | {
        "positions_" + k: w[k] for k in ("rollout", "teacher", "train")}


def main(argv=None):
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="opcd-bench-"))
    model_dir = args.model or str(tiny.build_model(tmp / "model", size=args.size, image_size=128))
    splits.make_split(tmp / "train", "train", per_level=-(-args.batch_size * (args.steps + 1) // 12), kinds=("planning",),
                      image_size=128)
    rows = splits.load_split(tmp / "train", kinds=["planning"])
    n_params = sum(p.numel() for p in common.load_model(model_dir)[0].parameters())
    print(f"model {model_dir}: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, micro-batch {args.micro_batch_size}, max {args.max_new_tokens} new tokens, fp32, "
          f"{args.steps} measured steps (medians), gradient checkpointing {'on' if args.grad_checkpointing else 'off'}")
    results = {}
    for b in [b for b in args.backends.split(",") if b]:
        results[OURS[b]] = r = ours(b, model_dir, rows, args, tmp)
        print(f"ours, {b}: {r['seconds_step']:.2f} s/step", flush=True)
    peers = [k for k in args.peers.split(",") if k]
    try:
        import trl
    except ImportError:
        print("TRL is not installed (pip install -r requirements-bench.txt): no peer rows")
        peers = []
    for kind in peers:
        name = {"distillation": "TRL DistillationTrainer, hf", "distillation-vllm": "TRL DistillationTrainer, vllm",
                "sdft": "TRL SDFTTrainer, hf, text prompts"}[kind]
        try:
            results[name] = peer(kind, model_dir, rows, args, tmp)
            print(f"{name}: {results[name]['seconds_step']:.2f} s/step", flush=True)
        except Exception as e:  # a peer's failure is a row of the table, not the end of the others
            print(f"{name} failed: {str(e).strip().splitlines()[-1][:200]}", flush=True)
    for r in results.values():
        r["samples_per_second"] = args.batch_size / r["seconds_step"]
    print(f"\n| row | rollout s | teacher s | train s | s/step | samples/s | vs {next(iter(results))} |")
    print("|---|---|---|---|---|---|---|")
    first = next(iter(results.values()))["samples_per_second"]
    for name, r in results.items():
        phases = [f"{r[k]:.2f}" if k in r else "-" for k in ("seconds_rollout", "seconds_teacher", "seconds_train")]
        print(f"| {name} | " + " | ".join(phases) + f" | {r['seconds_step']:.2f} | {r['samples_per_second']:.2f} | "
              f"{r['samples_per_second'] / first:.2f}x |")
    print("\nWork (Work: decoder positions forwarded a step, thousands, pads included; - where vLLM or a server ran them)")
    print("| row | rollout | teacher | train | teacher k positions/s | train k positions/s |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        k = {p: r.get("positions_" + p, 0) / 1e3 for p in ("rollout", "teacher", "train")}
        rate = [f"{k[p] / r['seconds_' + p]:.2f}" if k[p] and r.get("seconds_" + p) else "-" for p in ("teacher", "train")]
        print(f"| {name} | " + " | ".join(f"{k[p]:.1f}" if k[p] else "-" for p in k) + " | " + " | ".join(rate) + " |")
    for name, r in results.items():
        if not name.startswith("ours"):
            print(f"ours / {name}: " + ", ".join(f"{b.removeprefix('ours, ')} {o['samples_per_second'] / r['samples_per_second']:.2f}x"
                                                 for b, o in results.items() if b.startswith("ours")))
    if peers:
        print(f"peers: trl {trl.__version__}")


if __name__ == "__main__":
    main()
