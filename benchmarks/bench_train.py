"""Training and embedding throughput of the patch encoder (patch pairs/s, patches/s).

    python -m benchmarks.bench_train [--device cpu|cuda|auto] [--patch-size 32] [--steps 10]

Each timed training step is the full pipeline of ``copdssl train``: the loader reads a location
batch of int16 patches from memory-mapped ``.npy`` files (background threads, pinned memory on
CUDA), the batch is normalised and augmented twice on the device, MoCo computes queries and keys
(shuffle-BN) against the per-location queue, the IFM loss is back-propagated and SGD updates the
query encoder (the key encoder follows by momentum). The encoder is the reference 3D CNN with the
schema's default widths (8, 16, 32, 64, 128).

Configurations: CPU with ``--threads`` threads, ``channels_last_3d`` on and off; CUDA (when
present or asked for) with bf16 autocast, and fp32 for comparison. For every configuration the
time the training loop spent waiting for the loader is reported next to the compute time (a
loader that keeps up shows a wait fraction near 0), and on CUDA the GPU utilisation sampled by
``torch.cuda.utilization()`` (or ``nvidia-smi``) during the timed steps. Embedding throughput is
``models.embed.embed_patches`` over the patches of a few subjects (eval mode, no grad, bf16 on
CUDA, channels_last_3d on CPU). Timings are best-of-``--rounds`` (shared machines).

Writes ``benchmarks/out/train.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "out" / "train.json"


def make_store(root: Path, n_subjects: int, n_locations: int, patch_size: int, seed: int = 0):
    """Random int16 HU patch files [P, S, S, S] on disk, opened as a memory-mapped PatchStore."""
    from models.data import PatchStore
    from pipeline.files import write_npy

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_subjects):
        path = root / f"B{i:04d}.npy"
        write_npy(path, rng.integers(-1024, 241, size=(n_locations,) + (patch_size,) * 3, dtype=np.int16))
        paths.append(path)
    locations = rng.uniform(-1, 1, size=(n_locations, 3)).astype(np.float32)
    return PatchStore(paths), locations


def make_work_dir(work: Path, n_subjects: int, n_locations: int, patch_size: int, seed: int = 0) -> None:
    """A ``work/`` directory that ``copdssl train`` accepts: subjects.tsv, atlas/grid.npz,
    patches/{sid}.npy (random int16 HU) and ok patches statuses (for the torchrun benchmark)."""
    from pipeline.files import write_json, write_npy, write_npz, write_text
    from pipeline.layout import Layout

    layout = Layout(work)
    rng = np.random.default_rng(seed)
    sids = [f"B{i:05d}" for i in range(n_subjects)]
    for sid in sids:
        write_npy(layout.patches(sid), rng.integers(-1024, 241, size=(n_locations,) + (patch_size,) * 3, dtype=np.int16))
        write_json(layout.status("patches", sid), {"sid": sid, "stage": "patches", "status": "ok"})
    chain = np.arange(n_locations - 1)
    edges = np.concatenate([np.stack([chain, chain + 1]), np.stack([chain + 1, chain])], axis=1)
    write_npz(layout.grid(), locations=rng.uniform(-1, 1, size=(n_locations, 3)).astype(np.float32),
              edges=edges.astype(np.int64), edge_weight=np.full(edges.shape[1], 0.5, np.float32),
              patch_size=np.int64(patch_size))
    write_text(layout.subjects(), "sid\timage\tformat\n" + "".join(f"{sid}\tnone\tnifti\n" for sid in sids))


def settings_for(args, amp: bool) -> dict:
    from pipeline.config import run_settings, validate_config

    train = {"seed": 0, "epochs": 1, "steps_per_epoch": args.warmup + args.steps, "batch_size": args.batch_size,
             "num_workers": args.workers, "amp": amp,
             "moco": {"queue_size": args.batch_size * 16}}
    return run_settings(validate_config({"train": train, "runs": {"bench": {}}}), "bench")


class UtilisationSampler:
    """Samples GPU utilisation (%) every ``interval`` seconds in a background thread."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - pynvml missing: fall back to nvidia-smi
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      f"--id={self.device.index or 0}"], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except Exception:  # noqa: BLE001
                return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def bench_training(store, locations, args, device: torch.device, amp: bool, channels_last: bool) -> dict:
    """Timed full training steps (after ``args.warmup`` untimed ones)."""
    from models.train import Trainer

    settings = settings_for(args, amp)
    trainer = Trainer(settings, store, locations, device=device, show_progress=False, channels_last=channels_last)
    trainer.build()
    trainer.model.train()
    loader = trainer.make_loader()
    batches = iter(loader)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    sync()
    wait_before = loader.wait_seconds
    with (UtilisationSampler(device) if device.type == "cuda" else contextlib.nullcontext()) as sampler:
        started = time.perf_counter()
        for _ in range(args.steps):
            loss, _ = trainer.train_step(next(batches))
        sync()
        seconds = time.perf_counter() - started
    batches.close()
    wait = loader.wait_seconds - wait_before
    return {"kind": "train", "device": str(device), "amp_bf16": amp and device.type == "cuda",
            "channels_last_3d": channels_last, "batch_size": args.batch_size, "steps": args.steps,
            "seconds": seconds, "pairs_per_s": args.steps * args.batch_size / seconds,
            "loader_wait_s": wait, "loader_wait_fraction": wait / seconds,
            "gpu_util_percent": sampler.summary() if sampler is not None else None, "final_loss": float(loss)}


def bench_embedding(store, locations, args, device: torch.device) -> dict:
    from models.embed import embed_patches
    from models.encoder import encoder_from_settings

    from models.intensity import PatchInput

    settings = settings_for(args, amp=True)
    patch_input = PatchInput.from_settings(settings["input"])
    encoder = encoder_from_settings(settings["encoder"], args.patch_size, seed=0,
                                    in_channels=patch_input.channels).to(device).eval()
    if device.type == "cpu":
        encoder = encoder.to(memory_format=torch.channels_last_3d)
    subjects = min(len(store), 16 if device.type == "cuda" else 4)
    patches = np.concatenate([store.array(i) for i in range(subjects)])  # several subjects' patches
    locations = np.tile(locations, (subjects, 1))
    batch = 512 if device.type == "cuda" else 128
    embed_patches(encoder, patches[:batch], locations[:batch], patch_input, batch, device)  # warm-up
    repeats = max(1, args.embed_repeats)
    seconds = float("inf")
    for _ in range(repeats):  # best of repeats
        started = time.perf_counter()
        out = embed_patches(encoder, patches, locations, patch_input, batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = min(seconds, time.perf_counter() - started)
    return {"kind": "embed", "device": str(device), "amp_bf16": device.type == "cuda", "channels_last_3d": device.type == "cpu",
            "batch_size": batch, "patches": len(patches), "seconds": seconds,
            "patches_per_s": len(patches) / seconds, "feature_dim": int(out.shape[1])}


def markdown(rows: list[dict]) -> str:
    lines = ["| what | device | bf16 | channels_last_3d | batch | throughput | loader wait | GPU util |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "train":
            rate = f"{r['pairs_per_s']:.1f} pairs/s"
            wait = f"{100 * r['loader_wait_fraction']:.1f}% ({r['loader_wait_s']:.2f} s)"
        else:
            rate, wait = f"{r['patches_per_s']:.1f} patches/s", "-"
        util = "-" if r.get("gpu_util_percent") is None else f"{r['gpu_util_percent']:.0f}%"
        lines.append(f"| {r['kind']} | {r['device']} | {r['amp_bf16']} | {r['channels_last_3d']} | "
                     f"{r['batch_size']} | {rate} | {wait} | {util} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU always, plus CUDA when available")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="repeat each configuration; report the best")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    parser.add_argument("--subjects", type=int, default=None, help="patch files (default: 2 x batch size)")
    parser.add_argument("--locations", type=int, default=64, help="grid locations (rows per patch file)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="loader threads (train.num_workers)")
    parser.add_argument("--embed-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--make-work", type=Path, metavar="DIR",
                        help="only write a work directory for `copdssl train` (see gpu_train.sh) and exit")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.make_work:
        make_work_dir(args.make_work, args.subjects or 256, args.locations, args.patch_size)
        print(f"wrote {args.make_work}")
        return 0

    torch.set_num_threads(args.threads)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        configs: list[tuple[torch.device, bool, bool]] = []
        if args.device in ("auto", "cpu"):
            configs += [(torch.device("cpu"), False, True), (torch.device("cpu"), False, False)]
        if want_cuda:
            configs += [(torch.device("cuda"), True, False), (torch.device("cuda"), False, False)]
        stores = {}
        for device, amp, channels_last in configs:
            batch = args.batch_size or (128 if device.type == "cuda" else 32)
            key = (device.type, batch)
            if key not in stores:
                folder = Path(tmp) / f"{device.type}_{batch}"
                folder.mkdir()
                stores[key] = make_store(folder, args.subjects or 2 * batch, args.locations, args.patch_size)
            store, locations = stores[key]
            run_args = argparse.Namespace(**{**vars(args), "batch_size": batch})
            # best of --rounds: the first run in a process also pays one-off costs (oneDNN
            # primitive creation, allocator growth) and the machine may be shared
            trials = [bench_training(store, locations, run_args, device, amp, channels_last)
                      for _ in range(args.rounds)]
            row = max(trials, key=lambda r: r["pairs_per_s"])
            row["rounds_pairs_per_s"] = [r["pairs_per_s"] for r in trials]
            rows.append(row)
            print(f"train {device} bf16={amp} channels_last={channels_last}: {row['pairs_per_s']:.1f} pairs/s, "
                  f"loader wait {100 * row['loader_wait_fraction']:.1f}%", flush=True)
        for device_type in dict.fromkeys(c[0].type for c in configs):
            store, locations = next(v for k, v in stores.items() if k[0] == device_type)
            batch = args.batch_size or (128 if device_type == "cuda" else 32)
            run_args = argparse.Namespace(**{**vars(args), "batch_size": batch})
            row = bench_embedding(store, locations, run_args, torch.device(device_type))
            rows.append(row)
            print(f"embed {device_type}: {row['patches_per_s']:.1f} patches/s", flush=True)
    result = {"command": " ".join(["python -m benchmarks.bench_train", *argv]),
              "patch_size": args.patch_size, "locations": args.locations, "threads": args.threads,
              "workers": args.workers, "torch": torch.__version__, "host": platform.node(),
              "cpu_count": os.cpu_count(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from pipeline.files import write_json

    write_json(args.out, result)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
