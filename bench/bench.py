"""GPU benchmark: the llmbatch runners against the plain Hugging Face way, same machine, model and data.

    python3 bench/bench.py --out bench-out                # 1 GPU and all GPUs of the machine
    python3 bench/bench.py --gpus 1,2 --out bench-out
    python3 bench/bench.py --smoke                        # the whole pipeline on CPU, tiny model

Every measurement runs in its own process (clean GPU memory and state), one after the other:
  ceilings    copy bandwidth and bf16 matmul rate of each GPU           bench/ceilings.py
  inference   llmbatch.runners.infer through `accelerate launch`        on 1 and N GPUs
              generate one prompt at a time / batches of 64 / of 256    bench/hf_generate.py, 1 GPU, subsets
  finetune    llmbatch.runners.finetune vs HF Trainer + PEFT LoRA       bench/hf_trainer.py, 1 and N GPUs
              on fixed 1,024-token sequences and on variable-length examples (packing on for llmbatch);
              peers: the padded Trainer, and the strongest one, Trainer + Liger-Kernel (fixed) and
              Trainer + DataCollatorWithFlattening + Liger-Kernel (variable); targets hold against it
The model (random weights in a real architecture's shape) and the data are built first by
bench/workloads.py. Writes bench.json, bench.md and logs.tar.gz into --out; prints the table last.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from importlib import metadata
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "src"))  # llmbatch, uninstalled: the job step, spec and rundir (no submitit)
sys.path.insert(0, str(BENCH))

import workloads

from llmbatch.jobstep import NodePlace, make_plan, node_command
from llmbatch.models import resolve_models
from llmbatch.rundir import RunDir, atomic_write, read_json
from llmbatch.spec import dump_spec, load_resolved, load_spec

# NVLink multicast off for every process: shared multi-GPU hosts may forbid it.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# Same LoRA settings on both sides.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LEARNING_RATE, LR_WARMUP_STEPS = 2e-4, 2

# Rough rates on an H200 for the Qwen2.5-1.5B shape, to plan the time of each phase.
REF_RATES = {"loop": 27, "b64": 850, "b256": 3100, "llmbatch_infer": 10000, "train": 30000}
STARTUP_S = 15  # python + torch + model load, per process; accelerate launch adds a few seconds

# Dense bf16 peak of the data sheet, TFLOP/s per GPU (SXM parts), for model FLOPs utilisation (MFU).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

# The fine-tuning peers: (method name, bench/hf_trainer.py options), for fixed and for variable lengths.
PADDED_TRAINER = "HF Trainer + PEFT"
FT_PEERS = {
    False: [(PADDED_TRAINER, []), ("HF Trainer + PEFT + Liger", ["--liger"])],
    True: [(PADDED_TRAINER, []), ("HF Trainer + PEFT + flattening + Liger", ["--collator", "flatten", "--liger"])],
}

TARGETS = {
    "infer_vs_generate": 5.0,
    "infer_vs_loop": 100.0,
    "ft_fixed": 1.3,
    "ft_var": 1.3,
    "scaling_efficiency": 0.95,
}  # 1 -> 2 GPUs at least 1.9x; for N GPUs, 0.95 * N


# --- processes ---------------------------------------------------------------------------------------


class GpuMemory:
    """Peak memory used on each GPU while a process runs, sampled by nvidia-smi every 200 ms, minus what
    was in use before it started. The caching allocators keep their peak reserved, so sampling misses
    little. Applied the same way to every row; None where there is no nvidia-smi (CPU)."""

    def __init__(self, indices: list[int]):
        self.indices, self.peak, self.proc = indices, {}, None
        self.baseline = self._query()

    @staticmethod
    def _query() -> dict[int, float] | None:
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
        return {int(i): float(m) for i, m in (line.split(",") for line in out.stdout.strip().splitlines())}

    def __enter__(self):
        if self.baseline is not None:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                index, used = (x.strip() for x in line.split(","))
                index, used = int(index), float(used)
            except ValueError:
                continue
            self.peak[index] = max(self.peak.get(index, 0.0), used)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def peak_gb(self) -> float | None:
        """The largest per-GPU peak over the GPUs this run used, in GiB."""
        if self.baseline is None or not self.peak:
            return None
        return round(max(self.peak.get(i, 0.0) - self.baseline.get(i, 0.0) for i in self.indices) / 1024, 2)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.work, self.out = args.work.resolve(), args.out.resolve()
        self.logs = self.work / "logs"
        for d in (self.work, self.out):
            d.mkdir(parents=True, exist_ok=True)
        self.cpu = args.smoke or not shutil.which("nvidia-smi")
        # A fresh start for everything but the model and data (kept for reruns on the same machine).
        for old in ("runs", "specs", "logs"):
            shutil.rmtree(self.work / old, ignore_errors=True)
        for old in self.work.glob("*.json"):
            old.unlink()
        self.logs.mkdir()
        self.rows: list[dict] = []
        self.phases: list[dict] = []
        self.ceilings: dict = {}
        self.e2e: dict = {}
        self.port = random.Random().randrange(20000, 30000)
        self.gpu_name: str | None = None  # for MFU: the data sheet's peak of this GPU

    def remaining(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.started)

    def env(self, gpus: int) -> dict[str, str]:
        env = (
            dict(os.environ)
            | SAFE_ENV
            | {
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        if self.cpu:
            # Several CPU processes need --multi_gpu plus this (accelerate's --cpu starts only one).
            env |= {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        else:
            # Pinned even for 1 GPU: Trainer in one process with several GPUs visible uses DataParallel.
            # PCI order, as nvidia-smi numbers them, so the memory sampler watches the right GPUs.
            env |= {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
        return env

    def run(self, name: str, argv: list[str], gpus: int, estimate_s: float, env: dict[str, str] | None = None) -> dict:
        """Run one measurement process (`env` added to its environment, this benchmark's settings
        winning); its output goes to logs/<name>.log. Never raises."""
        remaining = self.remaining()
        phase = {"name": name, "gpus": gpus, "estimate_s": round(estimate_s), "argv": argv}
        self.phases.append(phase)
        if remaining < min(estimate_s, 60):
            phase |= {"status": f"skipped: {remaining:.0f} s left of --deadline-s, about {estimate_s:.0f} s needed"}
            print(f"== {name}: {phase['status']}", flush=True)
            return phase
        timeout = min(self.args.phase_timeout_s, remaining)
        log = self.logs / f"{name}.log"
        print(
            f"== {name} ({gpus} {'process' if self.cpu else 'GPU'}{'es' if self.cpu and gpus > 1 else ''}"
            f"{'s' if not self.cpu and gpus > 1 else ''}; about {estimate_s:.0f} s, limit {timeout:.0f} s)",
            flush=True,
        )
        started = time.monotonic()
        with log.open("w") as f, GpuMemory(list(range(gpus))) as memory:
            f.write(" ".join(argv) + "\n\n")
            f.flush()
            # Own session, so a time-out can stop the process and everything it started (ranks).
            proc = subprocess.Popen(
                argv,
                env=(env or {}) | self.env(gpus),
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        wall = time.monotonic() - started
        phase |= {
            "wall_s": round(wall, 1),
            "rc": rc,
            "peak_mem_gb": memory.peak_gb(),
            "log": str(log),
            "status": "ok" if rc == 0 else ("timed out" if rc is None else f"failed (exit {rc})"),
        }
        if rc != 0:
            phase["log_tail"] = log.read_text(errors="replace")[-3000:]
            print(f"   {phase['status']}; last lines of {log}:\n" + "\n".join(phase["log_tail"].splitlines()[-15:]))
        print(f"   {phase['status']} in {wall:.0f} s", flush=True)
        return phase

    # --- setup -------------------------------------------------------------------------------------

    def build_assets(self) -> None:
        assets = self.work / "assets"
        manifest = read_json(assets / "manifest.json")
        if (
            manifest
            and manifest["shape_name"] == self.args.shape
            and manifest["sizes"] == workloads.workload_sizes(self.args.smoke)
            and not self.args.rebuild
        ):
            print(f"== assets: reusing {assets}")
        else:
            shutil.rmtree(assets, ignore_errors=True)
            argv = [sys.executable, str(BENCH / "workloads.py"), "--shape", self.args.shape, "--out", str(assets)]
            phase = self.run("assets", argv + (["--smoke"] if self.args.smoke else []), 1, 30)
            if phase["status"] != "ok":
                raise SystemExit("building the model and data failed; see above")
        self.manifest = read_json(assets / "manifest.json")
        self.model, self.data = assets / "model", assets / "data"
        self.sizes, self.shape = self.manifest["sizes"], self.manifest["shape"]
        self.prompt_lens = [len(json.loads(line)["prompt"].split()) for line in (self.data / "infer.jsonl").open()]

    def measure_ceilings(self) -> None:
        path = self.work / "ceilings.json"
        argv = [sys.executable, str(BENCH / "ceilings.py"), "--out", str(path)] + (["--smoke"] if self.cpu else [])
        gpus = 1 if self.cpu else self.args.gpu_count
        if self.run("ceilings", argv, gpus, 15)["status"] == "ok":
            self.ceilings = read_json(path)

    # --- inference -----------------------------------------------------------------------------------

    def hf_generate(self, batch_size: int, prompts: int) -> None:
        name = "generate-loop" if batch_size == 1 else f"generate-b{batch_size}"
        prompts = min(prompts, len(self.prompt_lens))
        result = self.work / f"{name}.json"
        argv = [
            sys.executable,
            str(BENCH / "hf_generate.py"),
            "--model",
            str(self.model),
            "--data",
            str(self.data / "infer.jsonl"),
            "--batch-size",
            str(batch_size),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            str(self.sizes["new_tokens"]),
            "--out",
            str(result),
        ]
        rate = REF_RATES["loop" if batch_size == 1 else f"b{batch_size}" if batch_size in (64, 256) else "b256"]
        phase = self.run(name, argv, 1, STARTUP_S + prompts * self.sizes["new_tokens"] / rate)
        raw = read_json(result) if phase["status"] == "ok" else None
        method = "generate, one prompt at a time" if batch_size == 1 else f"generate, batches of {batch_size}"
        row = self.row("inference", method, 1, phase, raw, f"{prompts} of {len(self.prompt_lens)} prompts")
        if raw:
            row["tokens_per_s"] = raw["tokens_per_s"]
            row["ceiling_pct"] = self.decode_pct(
                raw["decode_steps"], raw["kv_positions"], raw["tokens_per_s"], raw["generated_tokens"], 1
            )
        self.rows.append(row)

    def llmbatch_infer(self, gpus: int) -> None:
        name = f"llmbatch-infer-x{gpus}"
        n, new = len(self.prompt_lens), self.sizes["new_tokens"]
        spec = {
            "name": name,
            "model": {"path": str(self.model)},
            "data": {"path": str(self.data / "infer.jsonl"), "id_field": "id", "prompt_field": "prompt"},
            "generation": {"max_new_tokens": new, "do_sample": False, "ignore_eos": True},
            "resources": {"nodes": 1, "gpus_per_node": gpus},
        }
        run = self.make_run("infer", name, spec)
        estimate = 2 * STARTUP_S + n * new / REF_RATES["llmbatch_infer"] / gpus
        cmd = self.node_command(run, gpus)
        phase = self.run(name, cmd.argv, gpus, estimate, cmd.env)
        metrics = read_json(run.metrics_file) if phase["status"] == "ok" else None
        row = self.row("inference", "llmbatch infer", gpus, phase, metrics, f"all {n} prompts")
        row["run_dir"] = str(run.path)
        if metrics:
            expected = n * new
            generated = metrics.get("output_tokens", expected)
            results = sum(1 for _ in run.results_file.open()) if run.results_file.exists() else None
            row["tokens_per_s"] = metrics.get("tokens_per_s")
            row["e2e_tokens_per_s"] = generated / phase["wall_s"]
            if metrics.get("decode_steps") is not None:  # the engine ran: where its time went
                row["sample"] += (
                    f"; prefill {metrics['prefill_s']:.1f} s, decode {metrics['decode_s']:.1f} s "
                    f"({metrics['decode_steps']} steps), slots {metrics['occupancy']:.0%} busy"
                )
            if generated != expected or results != n:
                row["status"] = f"check: {generated} tokens generated of {expected}, {results} results of {n}"
            steps = self.decode_steps(metrics, Path(phase["log"]), new)
            row["ceiling_is_lower_bound"] = steps is None
            if row["tokens_per_s"]:
                row["ceiling_pct"] = self.decode_pct(
                    steps or new * gpus,
                    workloads.kv_positions(self.prompt_lens, new),
                    row["tokens_per_s"],
                    generated,
                    gpus,
                )
        self.rows.append(row)

    def submit_e2e(self) -> None:
        """`python submit.py infer` on the same spec as the llmbatch row, on this machine, timed from
        the command to its summary: spec checks, model load, generation, gather."""
        n, new = len(self.prompt_lens), self.sizes["new_tokens"]
        spec = {
            "name": "submit-infer",
            "model": {"path": str(self.model)},
            "data": {"path": str(self.data / "infer.jsonl"), "id_field": "id", "prompt_field": "prompt"},
            "generation": {"max_new_tokens": new, "do_sample": False, "ignore_eos": True},
            "resources": {"nodes": 1, "gpus_per_node": 1},
            "output": {"root": str(self.work / "runs")},
        }
        spec_file = self.work / "specs" / "submit-infer.yaml"
        spec_file.parent.mkdir(exist_ok=True)
        spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        argv = [sys.executable, str(REPO / "submit.py"), "infer", str(spec_file), "--executor", "local"]
        phase = self.run("submit-infer-e2e", argv, 1, 3 * STARTUP_S + n * new / REF_RATES["llmbatch_infer"])
        self.e2e = {"prompts": n, "new_tokens": new, "wall_s": phase.get("wall_s"), "status": phase["status"]}

    @staticmethod
    def decode_steps(metrics: dict, log: Path, new_tokens: int) -> int | None:
        """Forward passes of the run, summed over ranks: the engine's decode steps (metrics.json), or for
        generate's batches new_tokens per batch, from the line each rank prints ("rank R of W, ...:
        N batches of"). None if neither: the caller then takes the least possible (new_tokens per
        rank), a lower bound."""
        if metrics.get("decode_steps"):
            return metrics["decode_steps"]
        found = dict(re.findall(r"^rank (\d+) of \d+, .* (\d+) batches of", log.read_text(errors="replace"), re.M))
        return sum(int(b) for b in found.values()) * new_tokens if found else None

    def decode_pct(self, steps: int, kv_positions: int, tokens_per_s: float, tokens: int, gpus: int) -> float | None:
        """Bytes the decode had to read (weights once a forward pass, K/V once a token) over the time it
        took, as a share of the measured copy bandwidth of the GPUs it ran on."""
        if not self.ceilings:
            return None
        seconds = tokens / tokens_per_s
        bytes_read = workloads.decode_bytes(self.shape, steps, kv_positions)
        return 100 * bytes_read / seconds / (self.ceilings["copy_GBps"] * 1e9 * gpus)

    # --- fine-tuning ---------------------------------------------------------------------------------

    def finetune_setup(self, variable: bool) -> dict:
        """Batch shapes so that both sides train on about the same real tokens per optimizer step.

        Fixed: 8 sequences of fixed_len per GPU on both sides. Variable: llmbatch packs rows of var_max
        tokens, 4 rows per GPU; a Trainer step takes as many examples per GPU as those 4 rows hold on
        average (found by packing the data the way the runner does), as 8 examples per forward pass
        and gradient accumulation: 30-odd examples padded to the longest in one pass would need far
        more memory than the GPU has when a long example is among them.
        """
        if not variable:
            return {
                "data": self.data / "ft_fixed.jsonl",
                "seq_len": self.sizes["fixed_len"],
                "packing": False,
                "micro_batch": self.args.fixed_batch,
                "hf_batch": self.args.fixed_batch,
                "hf_accum": 1,
                "len_weighted": self.sizes["fixed_len"],
            }
        lengths = [
            len(json.loads(line)["prompt"].split()) + len(json.loads(line)["completion"].split())
            for line in (self.data / "ft_var.jsonl").open()
        ]
        seq_len, rows = self.sizes["var_max"], 0
        used = seq_len
        for n in random.Random(0).sample(lengths, len(lengths)):
            if used + n > seq_len:
                rows, used = rows + 1, 0
            used += n
        stats = self.manifest["ft_var"]
        per_step = self.args.var_rows * len(lengths) / rows  # examples in llmbatch's step, per GPU
        hf_batch = self.args.var_hf_batch
        return {
            "data": self.data / "ft_var.jsonl",
            "seq_len": seq_len,
            "packing": True,
            "micro_batch": self.args.var_rows,
            "hf_batch": hf_batch,
            "hf_accum": max(1, round(per_step / hf_batch)),
            "examples_per_step": round(per_step, 1),
            "packed_rows": rows,
            "packing_fill": round(sum(lengths) / (rows * seq_len), 3),
            "len_weighted": stats["sum_sq"] / stats["sum"],
        }

    def hf_trainer(self, workload: str, setup: dict, gpus: int, method: str, options: list[str]) -> None:
        flatten = "flatten" in options
        name = f"trainer-{workload.split()[1]}-x{gpus}" + "".join("-" + o.lstrip("-") for o in options)
        result = self.work / f"{name}.json"
        # Flattening packs a whole step's examples into one row: no accumulation needed.
        batch, accum = (round(setup["examples_per_step"]), 1) if flatten else (setup["hf_batch"], setup["hf_accum"])
        script = [
            str(BENCH / "hf_trainer.py"),
            "--model",
            str(self.model),
            "--data",
            str(setup["data"]),
            "--seq-len",
            str(setup["seq_len"]),
            "--batch-size",
            str(batch),
            "--grad-accum",
            str(accum),
            *options,
            "--max-steps",
            str(self.args.ft_steps),
            "--skip-steps",
            str(self.args.ft_skip),
            "--lora-r",
            str(LORA["r"]),
            "--lora-alpha",
            str(LORA["alpha"]),
            "--lora-dropout",
            str(LORA["dropout"]),
            "--lr",
            str(LEARNING_RATE),
            "--warmup-steps",
            str(LR_WARMUP_STEPS),
            "--out",
            str(result),
        ]
        script += ["--find-unused-parameters"] if self.args.hf_find_unused else []
        script += ["--gradient-checkpointing"] if self.args.gradient_checkpointing else []
        if gpus == 1:
            argv = [sys.executable] + script
        else:
            argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(gpus),
            ] + script
        phase = self.run(name, argv, gpus, self.ft_estimate(setup, gpus))
        raw = read_json(result) if phase["status"] == "ok" else None
        what = (
            f"{batch} x {setup['seq_len']} tok"
            if not setup["packing"]
            else (f"{batch} examples flattened" if flatten else f"{batch} examples x {accum} accumulated")
        )
        row = self.row(workload, method, gpus, phase, raw, self.ft_sample(what))
        if raw:
            row["tokens_per_s"] = raw["tokens_per_s"]
            row["ceiling_pct"] = self.train_pct(raw["tokens_per_s"], setup, gpus)
            row["mfu_pct"] = self.mfu(raw["tokens_per_s"], setup, gpus)
        self.rows.append(row)

    def llmbatch_finetune(self, workload: str, setup: dict, gpus: int) -> None:
        name = f"llmbatch-{workload.split()[1]}-x{gpus}"
        never = 10**6  # no evaluation and no checkpoint inside the timed steps
        spec = {
            "name": name,
            "model": {"path": str(self.model)},
            "data": {
                "path": str(setup["data"]),
                "id_field": "id",
                "prompt_field": "prompt",
                "reference_field": "completion",
            },
            "lora": dict(LORA),
            "train": {
                "max_steps": self.args.ft_steps,
                "learning_rate": LEARNING_RATE,
                "warmup_steps": LR_WARMUP_STEPS,
                "lr_schedule": "cosine",
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "micro_batch_size": setup["micro_batch"],
                "grad_accum_steps": 1,
                "seq_len": setup["seq_len"],
                "packing": setup["packing"],
                "eval_every_steps": never,
                "gradient_checkpointing": self.args.gradient_checkpointing,
                "liger": self.args.liger,
                "eval_accuracy": False,
                "save_every_steps": never,
                "save_every_minutes": float(never),
            },
            "resources": {"nodes": 1, "gpus_per_node": gpus},
        }
        run = self.make_run("finetune", name, spec)
        cmd = self.node_command(run, gpus)
        phase = self.run(name, cmd.argv, gpus, self.ft_estimate(setup, gpus) + STARTUP_S, cmd.env)
        metrics = read_json(run.metrics_file) if phase["status"] == "ok" else None
        what = (
            f"{setup['micro_batch']} packed rows of {setup['seq_len']}"
            if setup["packing"]
            else f"{setup['micro_batch']} x {setup['seq_len']} tok"
        )
        row = self.row(workload, "llmbatch finetune", gpus, phase, metrics, self.ft_sample(what))
        row["run_dir"] = str(run.path)
        if metrics:
            row["tokens_per_s"], row["timing"] = self.steady_rate(run, metrics)
            row["ceiling_pct"] = self.train_pct(row["tokens_per_s"], setup, gpus) if row["tokens_per_s"] else None
            row["mfu_pct"] = self.mfu(row["tokens_per_s"], setup, gpus)
        self.rows.append(row)

    def steady_rate(self, run: RunDir, metrics: dict) -> tuple[float | None, str]:
        """Tokens/s after the first --ft-skip steps, from the runner's per-step log, as for the Trainer.

        The log's cumulative `tokens` (real tokens, all ranks) and a clock: `time` (wall clock at the
        end of the step) if the runner writes it, else `elapsed_s` (the runner's summed step times,
        which leave out work between steps); failing both, metrics.json's train_tokens_per_s (all steps).
        """
        log = run.train_metrics_file
        rows = [json.loads(line) for line in log.open()] if log.exists() else []
        steps = sorted((r for r in rows if "loss" in r and "tokens" in r), key=lambda r: r["step"])
        skip = self.args.ft_skip
        for clock in ("time", "wall_s", "elapsed_s"):
            if len(steps) > skip and all(clock in r for r in steps):
                first, last = steps[skip - 1], steps[-1]
                if last[clock] > first[clock]:
                    return (last["tokens"] - first["tokens"]) / (
                        last[clock] - first[clock]
                    ), f"steps {skip + 1}-{last['step']}, clock '{clock}' of train_metrics.jsonl"
        return metrics.get("train_tokens_per_s"), "metrics.json train_tokens_per_s (all steps)"

    def train_pct(self, tokens_per_s: float, setup: dict, gpus: int) -> float | None:
        """Useful training FLOPs per second (workloads.train_flops_per_token) as a share of the measured
        bf16 matmul rate of the GPUs it ran on."""
        if not self.ceilings:
            return None
        return 100 * self.train_flops(tokens_per_s, setup) / (self.ceilings["matmul_tflops"] * 1e12 * gpus)

    def train_flops(self, tokens_per_s: float, setup: dict) -> float:
        return workloads.train_flops_per_token(self.shape, LORA["r"], setup["len_weighted"]) * tokens_per_s

    def mfu(self, tokens_per_s: float | None, setup: dict, gpus: int) -> float | None:
        """Model FLOPs utilisation: the same useful FLOPs per second as a share of the data sheet's dense
        bf16 peak (PEAK_BF16_TFLOPS), the usual definition; None for a GPU not in that table."""
        name = self.gpu_name or ""
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if not tokens_per_s or peak is None:
            return None
        return 100 * self.train_flops(tokens_per_s, setup) / (peak * 1e12 * gpus)

    def ft_sample(self, what: str) -> str:
        return f"{self.args.ft_steps - self.args.ft_skip} steps after {self.args.ft_skip}, {what} per GPU"

    def ft_estimate(self, setup: dict, gpus: int) -> float:
        tokens = self.args.ft_steps * gpus * setup["micro_batch"] * setup["seq_len"]
        return 2 * STARTUP_S + tokens / (REF_RATES["train"] * gpus * 0.9)

    # --- llmbatch run folders ------------------------------------------------------------------------

    def make_run(self, kind: str, name: str, raw: dict) -> RunDir:
        """A run folder with the resolved spec, as `submit.py` makes it before launching."""
        spec_file = self.work / "specs" / f"{name}.yaml"
        spec_file.parent.mkdir(exist_ok=True)
        spec_file.write_text(yaml.safe_dump(raw | {"output": {"root": str(self.work / "runs")}}, sort_keys=False))
        spec = resolve_models(load_spec(spec_file, kind), spec_file)
        run = RunDir.create(spec.output.root, spec.name)
        atomic_write(run.spec_file, dump_spec(spec))
        return run

    def node_command(self, run: RunDir, gpus: int):
        """What llmbatch's node job runs for `run` on one node of `gpus` GPUs (one thread per process on
        CPU): the runner of the spec's kind through `accelerate launch`, bf16 for fine-tuning, none for
        inference (the runner loads the model in bf16 itself)."""
        self.port += 1
        plan = dataclasses.replace(make_plan(load_resolved(run.spec_file), run.path), cpu_threads_per_proc=1)
        place = NodePlace(
            node_rank=0, main_host="127.0.0.1", port=self.port, attempt=0, job_id="bench", use_cuda=not self.cpu
        )
        return node_command(plan, place)

    @staticmethod
    def row(workload: str, method: str, gpus: int, phase: dict, raw: dict | None, sample: str) -> dict:
        return {
            "workload": workload,
            "method": method,
            "gpus": gpus,
            "sample": sample,
            "status": phase["status"],
            "tokens_per_s": None,
            "peak_mem_gb": phase.get("peak_mem_gb"),
            "ceiling_pct": None,
            "wall_s": phase.get("wall_s"),
            "phase": phase["name"],
            "raw": raw,
        }


# --- results -----------------------------------------------------------------------------------------


def fmt(x, spec=",.0f", suffix="") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def torch_mem(row: dict) -> float | None:
    raw = row.get("raw") or {}
    return raw.get("torch_peak_reserved_gb") or raw.get("peak_gpu_mem_gb")


def judge(rows: list[dict]) -> None:
    """Fill in per-GPU rates, scaling, comparisons with the peers, and the targets."""

    def find(workload, method, gpus):
        return next(
            (
                r
                for r in rows
                if r["workload"] == workload and r["method"] == method and r["gpus"] == gpus and r["tokens_per_s"]
            ),
            None,
        )

    for r in rows:
        r["per_gpu"] = r["tokens_per_s"] / r["gpus"] if r["tokens_per_s"] else None
        one = find(r["workload"], r["method"], 1)
        r["scaling"] = r["tokens_per_s"] / one["tokens_per_s"] if r["gpus"] > 1 and one and r["per_gpu"] else None
        r["checks"], r["vs_peer"], r["target"] = [], None, ""

    for r in rows:
        if not r["method"].startswith("llmbatch"):
            continue
        checks = []
        if r["workload"] == "inference":
            gens = [
                g
                for g in rows
                if g["workload"] == "inference" and g["method"].startswith("generate, batches") and g["per_gpu"]
            ]
            best = max(gens, key=lambda g: g["per_gpu"], default=None)
            loop = next((g for g in rows if g["method"] == "generate, one prompt at a time" and g["per_gpu"]), None)
            parts = []
            for peer, key, label in ((best, "infer_vs_generate", "best generate"), (loop, "infer_vs_loop", "loop")):
                ratio = r["per_gpu"] / peer["per_gpu"] if peer and r["per_gpu"] else None
                if peer:
                    label = f"{label} (b{peer['raw']['batch_size']})" if key == "infer_vs_generate" else label
                parts.append(f"{fmt(ratio, '.1f', 'x')} {label}")
                checks.append(
                    (f">= {TARGETS[key]:g}x {label.split(' (')[0]}", None if ratio is None else ratio >= TARGETS[key])
                )
            r["vs_peer"] = ", ".join(parts)
        else:
            # The targets hold against the strongest peer that ran; the padded Trainer is shown too.
            peers = [
                p
                for p in rows
                if p["workload"] == r["workload"]
                and p["gpus"] == r["gpus"]
                and p["method"].startswith("HF Trainer")
                and p["per_gpu"]
            ]
            peer = max(peers, key=lambda p: p["per_gpu"], default=None)
            padded = find(r["workload"], PADDED_TRAINER, r["gpus"])
            key = "ft_fixed" if "fixed" in r["workload"] else "ft_var"
            ratio = r["per_gpu"] / peer["per_gpu"] if peer and r["per_gpu"] else None
            label = peer["method"].replace("HF ", "").replace(" + PEFT", "") if peer else "strongest peer"
            r["vs_peer"] = f"{fmt(ratio, '.2f', 'x')} {label}"
            if padded and padded is not peer and r["per_gpu"]:
                r["vs_peer"] += f", {r['per_gpu'] / padded['per_gpu']:.2f}x padded Trainer"
            checks.append((f">= {TARGETS[key]:g}x {label}", None if ratio is None else ratio >= TARGETS[key]))
            # Peak memory: the same instrument on both rows (nvidia-smi, else torch's peak reserved).
            mine, theirs = (
                (r["peak_mem_gb"], peer and peer["peak_mem_gb"])
                if r["peak_mem_gb"] is not None
                else (torch_mem(r), peer and torch_mem(peer))
            )
            checks.append((f"peak mem <= {label}", None if mine is None or not theirs else mine <= theirs))
        if r["gpus"] > 1:
            need = TARGETS["scaling_efficiency"] * r["gpus"]
            checks.append((f"scaling >= {need:.2g}x", None if r["scaling"] is None else r["scaling"] >= need))
        r["checks"] = [{"target": t, "met": m} for t, m in checks]
        r["target"] = "; ".join(t for t, _ in checks)
        missed = [t for t, m in checks if m is False]
        unknown = [t for t, m in checks if m is None]
        r["met"] = "no: " + "; ".join(missed) if missed else ("n/a: " + "; ".join(unknown) if unknown else "yes")


def table(rows: list[dict]) -> str:
    head = [
        "workload",
        "method",
        "GPUs",
        "measured on",
        "tokens/s total",
        "tokens/s per GPU",
        "scaling vs 1 GPU",
        "peak mem/GPU (GiB)",
        "% of ceiling",
        "MFU",
        "speedup per GPU vs peer",
        "target",
        "met?",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scaling = (
            f"{r['scaling']:.2f}x ({100 * r['scaling'] / r['gpus']:.0f}%)"
            if r["scaling"]
            else ("-" if r["gpus"] == 1 else "n/a")
        )
        pct = fmt(r["ceiling_pct"], ".1f", "%")
        if r.get("ceiling_is_lower_bound") and r["ceiling_pct"] is not None:
            pct = ">=" + pct
        rate = fmt(r["tokens_per_s"]) if r["status"] == "ok" or r["tokens_per_s"] else r["status"]
        if r["status"] not in ("ok",) and r["tokens_per_s"]:
            rate += f" ({r['status']})"
        mem = fmt(r["peak_mem_gb"], ".1f") if r["peak_mem_gb"] is not None else fmt(torch_mem(r), ".1f")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["workload"],
                    r["method"],
                    str(r["gpus"]),
                    r["sample"],
                    rate,
                    fmt(r["per_gpu"]),
                    scaling,
                    mem,
                    pct,
                    fmt(r.get("mfu_pct"), ".1f", "%"),
                    r["vs_peer"] or "-",
                    r["target"] or "-",
                    r.get("met", "-"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def gpu_inventory() -> list[dict]:
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout
    return [
        dict(zip(("index", "name", "memory", "driver"), (x.strip() for x in line.split(","))))
        for line in out.strip().splitlines()
    ]


def pack_logs(bench: Bench) -> Path:
    """logs.tar.gz: every process's log, the peers' JSON, and the llmbatch run folders' small files."""
    path = bench.out / "logs.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in (
            sorted(bench.logs.glob("*.log"))
            + sorted(bench.work.glob("*.json"))
            + sorted((bench.work / "specs").glob("*.yaml"))
        ):
            tar.add(f, arcname=f"{f.parent.name}/{f.name}" if f.parent != bench.work else f.name)
        for run in sorted((bench.work / "runs").glob("*")):
            for f in sorted(run.rglob("*")):
                if (
                    f.is_file()
                    and f.suffix in (".json", ".jsonl", ".yaml", ".log", ".txt")
                    and f.stat().st_size < 5 << 20
                    and "checkpoints" not in f.parts
                    and "shards" not in f.parts
                ):
                    tar.add(f, arcname=f"runs/{f.relative_to(run.parent)}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model and data on CPU processes (pipeline check)")
    parser.add_argument("--gpus", help="GPU counts to run, e.g. 1,2 (default: 1 and all GPUs of the machine)")
    parser.add_argument(
        "--shape", help="model shape (default qwen2.5-1.5b; tiny with --smoke)", choices=sorted(workloads.SHAPES)
    )
    parser.add_argument("--out", type=Path, help="where bench.json, bench.md and logs.tar.gz go (default: <work>/out)")
    parser.add_argument("--work", type=Path, help="model, data, run folders (default /tmp/llmbatch-bench[-smoke])")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model and data even if present")
    parser.add_argument(
        "--only",
        default="infer,generate,e2e,ft-fixed,ft-var",
        help="comma list of parts to run: infer, generate, e2e (`submit.py infer`), ft-fixed, ft-var (default: all)",
    )
    budget = parser.add_argument_group("budget (the slow peers run on subsets; see README)")
    budget.add_argument("--loop-prompts", type=int, help="prompts for the one-at-a-time loop (default 8)")
    budget.add_argument("--b64-prompts", type=int, help="prompts for generate in batches of 64 (default 256)")
    budget.add_argument("--b256-prompts", type=int, help="prompts for generate in batches of 256 (default 512)")
    budget.add_argument("--ft-steps", type=int, help="optimizer steps per fine-tuning run (default 25)")
    budget.add_argument("--ft-skip", type=int, help="warm-up steps left out of the timing (default 5)")
    budget.add_argument(
        "--deadline-s",
        type=float,
        help="skip phases that would start after this many seconds (default 560: the whole run within 10 minutes)",
    )
    budget.add_argument("--phase-timeout-s", type=float, default=300, help="stop a phase after this long")
    shapes = parser.add_argument_group("batch shapes")
    shapes.add_argument("--fixed-batch", type=int, default=8, help="sequences per GPU, fixed-length data (default 8)")
    shapes.add_argument(
        "--var-rows", type=int, default=4, help="llmbatch packed rows per GPU, variable data (default 4)"
    )
    shapes.add_argument(
        "--var-hf-batch",
        type=int,
        default=4,
        help="Trainer examples per GPU per forward pass, variable data; gradient accumulation "
        "makes up the rest of llmbatch's step (default 4: 8 ran out of memory on an 80 GB H100)",
    )
    shapes.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass, on both sides (for large shapes)",
    )
    shapes.add_argument(
        "--liger",
        choices=("auto", "off"),
        default="auto",
        help="llmbatch's train.liger (default auto: Liger-Kernel's kernels where installed)",
    )
    shapes.add_argument(
        "--hf-find-unused",
        action="store_true",
        help="give the Trainer DDP's find_unused_parameters=True (its default for PEFT models)",
    )
    args = parser.parse_args()

    smoke = args.smoke
    defaults = dict(
        shape="tiny" if smoke else "qwen2.5-1.5b",
        loop_prompts=4 if smoke else 8,
        b64_prompts=8 if smoke else 256,
        b256_prompts=16 if smoke else 512,
        ft_steps=4 if smoke else 25,
        ft_skip=1 if smoke else 5,
        deadline_s=1800 if smoke else 560,
        work=Path("/tmp/llmbatch-bench-smoke" if smoke else "/tmp/llmbatch-bench"),
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or args.work / "out"
    os.environ.update(SAFE_ENV)

    inventory = gpu_inventory()
    args.gpu_count = len(inventory) if inventory and not smoke else 2
    counts = sorted({int(x) for x in args.gpus.split(",")}) if args.gpus else sorted({1, args.gpu_count})
    if not smoke and inventory and max(counts) > len(inventory):
        parser.error(f"--gpus {args.gpus}: this machine has {len(inventory)} GPUs")
    only = set(args.only.split(","))
    bench = Bench(args)
    bench.gpu_name = None if bench.cpu else inventory[0]["name"]
    print(
        f"llmbatch GPU benchmark: {'smoke (CPU processes)' if bench.cpu else inventory[0]['name']}, "
        f"GPU counts {counts}, shape {args.shape}, work {bench.work}, out {bench.out}",
        flush=True,
    )

    bench.build_assets()
    bench.measure_ceilings()
    many = [g for g in counts if g > 1]
    if "infer" in only and 1 in counts:
        bench.llmbatch_infer(1)
    if "generate" in only:
        bench.hf_generate(256, args.b256_prompts)
        bench.hf_generate(64, args.b64_prompts)
        bench.hf_generate(1, args.loop_prompts)
    if "e2e" in only:
        bench.submit_e2e()
    if "infer" in only:
        for g in many:
            bench.llmbatch_infer(g)
    for part, workload in (("ft-fixed", "finetune fixed-length"), ("ft-var", "finetune variable-length")):
        if part in only:
            setup = bench.finetune_setup(variable=part == "ft-var")
            bench.manifest[f"{part}-setup"] = {k: str(v) if isinstance(v, Path) else v for k, v in setup.items()}
            for g in counts:
                for method, options in FT_PEERS[part == "ft-var"]:
                    bench.hf_trainer(workload, setup, g, method, options)
                bench.llmbatch_finetune(workload, setup, g)

    judge(bench.rows)
    md = table(bench.rows)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    clocks = sorted({r["timing"] for r in bench.rows if r.get("timing")})
    notes = (
        f"Model: random weights, {args.shape} shape ({bench.manifest['params'] / 1e6:,.1f}M parameters), bf16. "
        f"Ceilings measured in this run: copy {fmt(bench.ceilings.get('copy_GBps'), ',.0f')} GB/s, "
        f"bf16 matmul {fmt(bench.ceilings.get('matmul_tflops'), ',.0f')} TFLOP/s per GPU. "
        f"Inference counts generated tokens; fine-tuning counts real (non-pad) tokens. "
        f"Peak memory: nvidia-smi, per GPU, above idle."
        + (
            f" `python submit.py infer` on the llmbatch row's spec, end to end on 1 GPU (model load and "
            f"gather included): {fmt(bench.e2e['wall_s'], '.1f')} s for {bench.e2e['prompts']} prompts x "
            f"{bench.e2e['new_tokens']} new tokens ({bench.e2e['status']})."
            if bench.e2e
            else ""
        )
        + (
            f" Fine-tuning rates leave out the first {args.ft_skip} steps; llmbatch's come from {'; '.join(clocks)}."
            if clocks
            else ""
        )
    )
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": smoke,
        "gpus": inventory,
        "gpu_counts": counts,
        "versions": versions(),
        "ceilings": bench.ceilings,
        "workloads": bench.manifest,
        "e2e": bench.e2e,
        "lora": LORA,
        "targets": TARGETS,
        "rows": bench.rows,
        "phases": bench.phases,
        "total_wall_s": round(time.monotonic() - bench.started, 1),
        "table_md": md,
        "notes": notes,
    }
    (bench.out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (bench.out / "bench.md").write_text(f"`{command}`\n\n{md}\n\n{notes}\n")
    pack_logs(bench)
    print(
        f"\nwrote {bench.out / 'bench.json'}, bench.md, logs.tar.gz; {result['total_wall_s']:.0f} s in all\n{notes}\n"
    )
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
