"""LoRA load + merge cost and the per-concept modes, ours vs diffusers (load_lora_adapter + fuse_lora).

A random kohya LoRA (SGM names) on every kohya target of the UNet (attention/proj/ff Linear: 722 modules on
SDXL; --locon adds the 66 ResBlock/sampler convs) is written to a temporary .safetensors file, then:
  load         omg.lora.load_lora(file) onto the device
  merge        ConceptWeights.merge (fp32 merge of every touched tensor, stored in the model dtype)
  swap         entering + leaving ConceptWeights.applied (parameter pointer swap)
  inplace      merge_lora_ + restore (backup of the touched tensors, exact restore)
  forward      one UNet forward: base, with the concept swapped in, through functional_call, and unmerged
               (UnmergedLora hooks)
  diffusers    lora_state_dict + UNet2DConditionModel.load_lora_adapter + fuse_lora (what the pipeline's
               load_lora_weights + fuse_lora do for the UNet), GPU only unless --diffusers
Run:  python -m bench.lora [--config sdxl|mid] [--ranks 64 256] [--dtype fp16] [--latent 128] [--locon]
Writes bench/results/lora_<gpu|cpu>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from bench.common import device_name, random_on_device, write_json
from omg.lora import ConceptWeights, UnmergedLora, load_lora, merge_lora_
from omg.unet import SpatialTransformer, UNet, UNetConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONFIGS = {
    "sdxl": UNetConfig.sdxl(),
    # 248 M parameters: SDXL's layout at 128 base channels and depth 4 instead of 10 (CPU-sized)
    "mid": dataclasses.replace(UNetConfig.sdxl(), model_channels=128, transformer_depth=(0, 2, 4),
                               transformer_depth_middle=4),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    """(seconds of the fastest of `repeat` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak(fn, device):
    """(peak bytes allocated above what was resident before, result); CUDA only."""
    if device.type != "cuda":
        return float("nan"), fn()
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base, out


def random_unet(cfg, device, dtype, seed=0):
    """N(0, 0.02) matrices, zero biases, identity norms; built directly on the device."""
    return random_on_device(lambda: UNet(cfg), device, dtype, seed)


def kohya_lora(unet, rank, locon, seed=1):
    """{key: tensor} of a kohya LoRA (fp16, alpha = rank/2) on every kohya target of unet."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    transformers = [n + "." for n, m in unet.named_modules() if isinstance(m, SpatialTransformer)]
    for name, m in unet.named_modules():
        in_transformer = name.startswith(tuple(transformers))
        conv_target = any(s in name for s in ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection",
                                              ".0.op", ".2.conv", ".1.conv"))
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not (in_transformer or locon and conv_target):
            continue
        if name.startswith(("input_blocks.0.", "out.")):
            continue
        w, key = m.weight, "lora_unet_" + name.replace(".", "_")
        r = min(rank, w.shape[0], w[0].numel())
        sd[key + ".lora_down.weight"] = (torch.randn(r, *w.shape[1:], generator=g) * 0.02).half()
        up_shape = (w.shape[0], r, 1, 1) if w.dim() == 4 else (w.shape[0], r)
        sd[key + ".lora_up.weight"] = (torch.randn(*up_shape, generator=g) * 0.02).half()
        sd[key + ".alpha"] = torch.tensor(r / 2, dtype=torch.float16)
    return sd


def unet_inputs(cfg, batch, latent, device, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g).to(device, dtype)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g).to(device, dtype)
    return x, torch.full((batch,), 500.0, device=device), ctx, y


def bench_ours(unet, path, strength, device, args):
    """Every step timed in interleaved rounds (min over args.repeat rounds): robust to bursts of noise."""
    cfg, dtype = unet.config, next(unet.parameters()).dtype
    lora = load_lora(path, device=device)
    cw = ConceptWeights.merge(unet, (lora, strength))
    x, t, ctx, y = unet_inputs(cfg, args.batch, args.latent, device, dtype)

    def swap():
        with cw.applied(unet):
            pass

    def forward_swapped():
        with cw.applied(unet):
            unet(x, t, ctx, y)

    def forward_unmerged():
        with UnmergedLora(unet, (lora, strength)):
            unet(x, t, ctx, y)

    steps = {
        "load_s": lambda: load_lora(path, device=device),
        "merge_s": lambda: ConceptWeights.merge(unet, (lora, strength)),
        "inplace_merge_restore_s": lambda: merge_lora_(unet, (lora, strength)).restore(),
        "swap_in_out_s": swap,
        "forward_base_s": lambda: unet(x, t, ctx, y),
        "forward_swapped_s": forward_swapped,  # swap in, forward, swap out
        "forward_functional_call_s": lambda: cw.call(unet, x, t, ctx, y),
        "forward_unmerged_s": forward_unmerged,  # hooks on, forward, hooks off
    }
    best = dict.fromkeys(steps, float("inf"))
    with torch.no_grad():
        for _ in range(args.repeat):
            for name, fn in steps.items():
                best[name] = min(best[name], timed(fn, device)[0])
    res = {k: round(v, 5) for k, v in best.items()}
    res["merge_peak_bytes"], _ = peak(lambda: ConceptWeights.merge(unet, (lora, strength)), device)
    res["lora_modules"], res["lora_bytes"] = len(lora.adapters), lora.nbytes
    touched = sum(unet.get_parameter(k).numel() * unet.get_parameter(k).element_size() for k in cw.tensors)
    res["touched_tensors"], res["touched_bytes"], res["concept_bytes"] = len(cw.tensors), touched, cw.nbytes
    res["unet_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
    handle = merge_lora_(unet, (lora, strength))
    res["inplace_backup_bytes"] = handle.nbytes
    handle.restore()
    hooks = UnmergedLora(unet, (lora, strength))
    res["unmerged_extra_bytes"] = hooks.extra_bytes
    hooks.remove()
    del cw, lora
    gc.collect()
    return res


def bench_diffusers(unet, path, strength, device, dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from bench.unet import diffusers_sdxl_config
    cfg = unet.config
    dcfg = diffusers_sdxl_config(cfg)
    dcfg["transformer_layers_per_block"] = tuple(max(d, 1) for d in cfg.transformer_depth)
    with torch.device("meta"):
        d = UNet2DConditionModel(**dcfg)
    sd = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
                                     d.config)
    d.load_state_dict(sd, assign=True, strict=True)
    d.eval()
    res = {}

    def load():
        state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(path, unet_config=d.config)
        d.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="concept")
    res["load_s"] = timed(load, device)[0]
    res["fuse_s"] = timed(lambda: d.fuse_lora(lora_scale=strength), device)[0]
    d.unfuse_lora()
    d.unload_lora()
    res["load_plus_fuse_peak_bytes"], _ = peak(lambda: (load(), d.fuse_lora(lora_scale=strength)), device)
    del d
    gc.collect()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; each figure is the min")
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--locon", action="store_true", help="also the 66 ResBlock / sampler convs (LoCon)")
    ap.add_argument("--diffusers", action="store_true", help="run the diffusers side on CPU too")
    args = ap.parse_args()
    device, dtype, cfg = torch.device(args.device), DTYPES[args.dtype], CONFIGS[args.config]
    unet = random_unet(cfg, device, dtype)
    results = {"config": args.config, "dtype": args.dtype, "latent": args.latent, "batch": args.batch,
               "locon": args.locon, "device_name": device_name(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            path = os.path.join(tmp, f"r{rank}.safetensors")
            sd = kohya_lora(unet, rank, args.locon)
            save_file(sd, path)
            run = {"file_bytes": os.path.getsize(path), "ours": bench_ours(unet, path, args.strength, device, args)}
            if device.type == "cuda" or args.diffusers:
                run["diffusers"] = bench_diffusers(unet, path, args.strength, device, dtype)
            results["runs"][f"rank{rank}"] = run
            print(f"rank {rank}:")
            for side, vals in run.items():
                print(f"  {side}: {vals}")
    print("wrote", write_json(f"lora_{args.config}", results))


if __name__ == "__main__":
    main()
