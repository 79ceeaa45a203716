"""The fine-tuning runner: packing, exact resume on 1 and 2 processes, preemption, the adapter it saves.

Runs go through `accelerate launch` as on a node (ACCELERATE_USE_CPU, `--multi_gpu` for more than one
process), with small overrides so that the whole file takes a few minutes on two cores.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from llmbatch.rundir import RunDir, read_jsonl
from llmbatch.runners.packing import IGNORE, Sequence, collate, pack, to_sequence
from llmbatch.runners.preemption import PREEMPTED_EXIT

from helpers import JOBS, infer, new_run, runner_command, trajectory

# Short sequences and micro-batches so an epoch is a few steps: 12 steps cross several epochs, and a
# stop mid-epoch exercises skipping the consumed batches. Accumulation 2 exercises no_sync.
SMALL = [
    "data.max_inputs=60",
    "train.max_steps=12",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=2",
    "train.warmup_steps=2",
    "train.eval_every_steps=5",
    "train.save_every_steps=4",
    "train.keep_last=2",
    "train.eval_accuracy=false",
    "lora.dropout=0.1",
]


def launch(
    run: RunDir, processes: int = 1, attempt: int = 0, *extra: str, expect_success: bool = True
) -> subprocess.CompletedProcess:
    """The run's runner (its spec's kind) on one node; `extra` goes to the runner."""
    cmd = runner_command(run, processes, attempt)
    proc = subprocess.run([*cmd.argv, *extra], env=os.environ | cmd.env, capture_output=True, text=True, timeout=300)
    if expect_success:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def finetune(run: RunDir, processes: int = 1, attempt: int = 0, *extra: str, **kwargs):
    return launch(run, processes, attempt, *extra, **kwargs)


def rows(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.train_metrics_file.read_text().splitlines()]


def checkpoint_names(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.checkpoints_dir.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    """One uninterrupted 1-process run, merged weights included: the reference for resumed runs."""
    run = new_run(tmp_path_factory.mktemp("uninterrupted"), model_dir, "finetune", [*SMALL, "train.merge=true"])
    old_umask = os.umask(RUN_UMASK)  # the ranks inherit it
    try:
        finetune(run)
    finally:
        os.umask(old_umask)
    return run


# --- packing --------------------------------------------------------------------------------------


def test_a_sequence_learns_only_its_completion():
    seq = to_sequence([1, 10, 11, 12], [20, 21, 2], seq_len=64, loss_on="completion")
    assert seq.input_ids == [1, 10, 11, 12, 20, 21]
    assert seq.targets == [IGNORE, IGNORE, IGNORE, 20, 21, 2]
    assert to_sequence([1, 10, 11, 12], [20, 21, 2], seq_len=64, loss_on="all").targets == [10, 11, 12, 20, 21, 2]
    assert to_sequence([1, 10, 11, 12], [20, 21, 2], seq_len=4, loss_on="completion").input_ids == [1, 10, 11, 12]


def test_packed_rows_hold_whole_sequences_and_positions_restart():
    seqs = [Sequence([i] * n, [i] * n) for i, n in enumerate([3, 4, 2, 5, 1], start=1)]
    rows = pack(seqs, seq_len=7)
    assert [[len(s.input_ids) for s in row] for row in rows] == [[3, 4], [2, 5], [1]]
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4], [0, 0, 1, 2, 3, 4, 5]]
    assert batch["input_ids"][2].tolist() == [5, 0, 0, 0, 0, 0, 0]
    assert batch["targets"][2].tolist() == [5] + [IGNORE] * 6
    assert batch["num_tokens"].item() == 15


def test_a_seq_len_shorter_than_the_prompts_is_an_error_not_a_zero_loss(make_run, capsys):
    from transformers import AutoTokenizer

    from llmbatch.data import load_inputs
    from llmbatch.runners.finetune import TooShortForData, make_rows
    from llmbatch.spec import load_resolved

    spec = load_resolved(make_run("finetune", overrides=["data.max_inputs=20"]).spec_file)
    tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
    inputs = load_inputs(spec.data)
    prompt_lengths = sorted(len(ids) for ids in tokenizer([e.prompt for e in inputs])["input_ids"])

    def rows(seq_len: int):
        return make_rows(
            dataclasses.replace(spec, train=dataclasses.replace(spec.train, seq_len=seq_len)),
            tokenizer,
            inputs,
            "data.path",
        )

    with pytest.raises(
        TooShortForData,
        match=r"^train.seq_len: \d+ tokens leave no target token of any input in "
        r"data.path",
    ):
        rows(prompt_lengths[0] - 1)
    # Shorter than the longest prompts only: those are left out, and the log says how many.
    seq_len = prompt_lengths[-1] - 1
    kept = sum(len(row) for row in rows(seq_len))
    lost = sum(length > seq_len for length in prompt_lengths)
    assert 0 < lost < len(inputs) and kept == len(inputs) - lost
    assert f"; {lost} of them keep no target token and are left out" in capsys.readouterr().out


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(make_run):
    """The same inputs, packed 3-4 to a row or one per padded row: the loss per target token and its
    gradient agree to float32 rounding (sums in another order), because attention stays inside each
    sequence and positions restart (see packing.py). Tolerance: 1e-5 relative."""
    from transformers import AutoTokenizer

    from llmbatch.data import load_inputs
    from llmbatch.runners.finetune import make_rows
    from llmbatch.runners.lora import load_lora_model, token_loss_sum
    from llmbatch.spec import load_resolved

    torch.manual_seed(0)
    spec = load_resolved(
        make_run("finetune", overrides=["data.max_inputs=24", "train.seq_len=64", "lora.dropout=0.0"]).spec_file
    )
    tokenizer = AutoTokenizer.from_pretrained(spec.model.path)
    inputs = load_inputs(spec.data)
    model, liger = load_lora_model(spec, torch.device("cpu"))
    assert not liger  # Liger-Kernel's kernels are Triton: CUDA only
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter a gradient-carrying effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)

    def loss_and_grads(packing: bool):
        rows = make_rows(
            dataclasses.replace(spec, train=dataclasses.replace(spec.train, packing=packing)),
            tokenizer,
            inputs,
            "data.path",
        )
        batch = collate(rows, tokenizer.pad_token_id)
        model.zero_grad()
        loss = token_loss_sum(model, batch) / (batch["targets"] != IGNORE).sum()
        loss.backward()
        return len(rows), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_rows, packed_loss, packed_grads = loss_and_grads(True)
    padded_rows, padded_loss, padded_grads = loss_and_grads(False)
    assert padded_rows == 24 and packed_rows <= 8
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max()), name


def test_the_loss_leaves_prompt_positions_out_of_the_head_and_equals_the_full_loss(model_dir):
    from transformers import AutoModelForCausalLM

    from llmbatch.runners.lora import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 250, (2, 16), generator=generator)
    targets = torch.full_like(input_ids, IGNORE)
    targets[0, 6:10], targets[1, 9:14] = input_ids[0, 7:11], input_ids[1, 10:15]
    batch = {"input_ids": input_ids, "position_ids": torch.arange(16).repeat(2, 1), "targets": targets}
    logits = model(input_ids=input_ids, position_ids=batch["position_ids"]).logits
    full = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    assert token_loss_sum(model, batch).item() == pytest.approx(full.item(), rel=1e-5)


# --- exact resume ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_stopped_and_resumed_on_one_process_matches_an_uninterrupted_one(uninterrupted, make_run):
    run = make_run("finetune", overrides=[*SMALL, "train.merge=true"])
    stopped = finetune(run, 1, 0, "--stop-at-step", "6", expect_success=False)
    assert stopped.returncode != 0 and f"exiting {PREEMPTED_EXIT}" in stopped.stdout
    assert checkpoint_names(run) == ["step-000004", "step-000006"]  # no temporary folder left
    assert not run.adapter_dir.exists()

    resumed = finetune(run, 1, 1)
    assert "resuming at step 6" in resumed.stdout
    # Bit for bit: the same adapter file, the same loss (and lr, grad norm, ...) at every step.
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        uninterrupted.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert trajectory(run) == trajectory(uninterrupted)
    assert checkpoint_names(run) == ["step-000006", "step-000008"]  # keep_last=2


@pytest.mark.slow
def test_a_run_preempted_on_one_of_two_ranks_resumes_exactly(make_run, tmp_path):
    """SIGUSR2 to rank 1 only: both ranks agree at the next step, save and exit; the resumed run
    (and a second, uninterrupted 2-process run) end with the same adapter and losses.

    Tolerance: none. DDP sums two ranks' gradients, and a + b == b + a in floating point, so the
    reduction order cannot differ between the runs; everything else is the same computation.
    """
    reference = make_run("finetune", overrides=SMALL)
    finetune(reference, 2)

    run = make_run("finetune", overrides=SMALL)
    log = tmp_path / "preempted.log"
    with log.open("w") as out:
        cmd = runner_command(run, 2)
        proc = subprocess.Popen(cmd.argv, env=os.environ | cmd.env, stdout=out, stderr=subprocess.STDOUT)
        rank1 = wait_for_rank(proc, 1)
        while not any(row.get("step", 0) >= 2 for row in read_jsonl(run.train_metrics_file)):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        rank1.send_signal(signal.SIGUSR2)
        proc.wait(timeout=120)
    stopped_at = max(row["step"] for row in rows(run))
    assert 2 <= stopped_at < 12, log.read_text()[-3000:]
    assert f"preempted at step {stopped_at}" in log.read_text()
    assert f"step-{stopped_at:06d}" in checkpoint_names(run)

    finetune(run, 2, 1)
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert trajectory(run) == trajectory(reference)
    assert json.loads(run.metrics_file.read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_torn_newest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(uninterrupted, make_run):
    """A file system that put the rename on disk before the data: the newest step-* folder holds a
    truncated file. The resumed run says so, loads the checkpoint before it, and still ends on the
    uninterrupted run's trajectory."""
    run = make_run("finetune", overrides=SMALL)
    finetune(run, 1, 0, "--stop-at-step", "6", expect_success=False)
    torn = run.checkpoints_dir / "step-000006" / "optimizer.bin"
    size = torn.stat().st_size
    torn.write_bytes(torn.read_bytes()[: size // 2])

    resumed = finetune(run, 1, 1)
    assert (
        f"finetune: checkpoint step-000006 is damaged (optimizer.bin has {size // 2} bytes, its manifest "
        f"says {size}); moved it to .step-000006.damaged and falling back to the previous complete "
        f"checkpoint"
    ) in resumed.stdout
    assert "resuming at step 4" in resumed.stdout
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        uninterrupted.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert trajectory(run) == trajectory(uninterrupted)
    assert checkpoint_names(run) == [".step-000006.damaged", "step-000004", "step-000008"]


@pytest.mark.slow
def test_a_checkpoint_whose_manifest_is_not_json_is_set_aside_by_resume(uninterrupted, make_run):
    """`python submit.py resume` on a run whose newest manifest.json is damaged: the command line checks
    the checkpoint the ranks will fall back to, the ranks set the damaged one aside, and the run ends
    on the uninterrupted run's trajectory."""
    from helpers import submit_cli

    run = make_run("finetune", overrides=SMALL)
    finetune(run, 1, 0, "--stop-at-step", "6", expect_success=False)
    run.update_state(kind="finetune", executor="local", job_ids=["1"])  # as the stopped local job left it
    (run.checkpoints_dir / "step-000006" / "manifest.json").write_text('{"files": {"optimizer.bin": ')

    resumed = submit_cli("resume", str(run.path))
    assert (
        "finetune: checkpoint step-000006 is damaged (its manifest.json is damaged, not valid JSON "
        "(Expecting value)); moved it to .step-000006.damaged and falling back to the previous complete "
        "checkpoint"
    ) in resumed.stdout
    assert "resuming at step 4" in resumed.stdout
    assert trajectory(run) == trajectory(uninterrupted)
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        uninterrupted.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_a_checkpoint_of_another_spec_is_refused_before_anything_is_queued(make_run, tmp_path, capsys):
    from llmbatch.checkpoints import check_resumable
    from llmbatch.cli import main
    from llmbatch.spec import load_resolved

    data = tmp_path / "train.jsonl"
    shutil.copy(JOBS / "data" / "parity" / "train.jsonl", data)
    run = make_run("finetune", overrides=[*SMALL, f"data.path={data}"])
    finetune(run, 1, 0, "--stop-at-step", "4", expect_success=False)
    run.update_state(kind="finetune", executor="local", job_ids=["1"])  # as the stopped local job left it
    checkpoint = run.checkpoints_dir / "step-000004"
    spec_text, data_text = run.spec_file.read_text(), data.read_text()

    def refused(key: str, saved, now) -> str:
        return (
            f"llmbatch: error: {checkpoint}: saved with {key}={saved!r}, but the run's spec now gives "
            f"{now!r}; a checkpoint of another spec cannot be resumed (put the value back, or start a "
            f"new run)\n"
        )

    run.spec_file.write_text(spec_text.replace("\n  r: 8\n", "\n  r: 4\n"))  # another LoRA rank
    assert main(["resume", str(run.path)]) == 2
    assert capsys.readouterr().err == refused("lora.r", 8, 4)
    assert not run.submitit_dir.exists()  # nothing was queued
    # The runner refuses it too, in one line, should it be started on such a spec anyway.
    started = finetune(run, 1, 1, expect_success=False)
    assert started.returncode != 0
    assert refused("lora.r", 8, 4).removeprefix("llmbatch: error: ") in started.stderr
    assert "Traceback" not in started.stderr.split("llmbatch: error:")[0]

    run.spec_file.write_text(spec_text)
    data.write_text(data_text.split("\n", 1)[1])  # other data: the first record gone
    assert main(["resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"llmbatch: error: {checkpoint}: saved with data.path contents (sha256)=")
        and len(err.splitlines()) == 1
    )
    assert not run.submitit_dir.exists()

    data.write_text(data_text)
    check_resumable(run.checkpoints_dir, load_resolved(run.spec_file))  # the same spec again: resumable


def wait_for_rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process of a rank, among the launcher's children."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not start")


# --- the end of a rank -----------------------------------------------------------------------------


# Loaded by each rank (sitecustomize): says at the rank's os._exit whether its process group still exists.
EXIT_PROBE = """\
import os, sys

_exit = os._exit


def _exit_saying_whether_the_group_lives(code):
    dist = sys.modules.get("torch.distributed")
    print(f"process group at exit: {'alive' if dist is not None and dist.is_initialized() else 'gone'}", flush=True)
    _exit(code)


os._exit = _exit_saying_whether_the_group_lives
"""


@pytest.mark.slow
def test_two_ranks_exit_promptly_with_their_process_group_never_destroyed(make_run, tmp_path):
    """A gloo process group destroyed at a rank's end (by end_training, then for good when main()
    returned and freed the DDP model) joined gloo's worker thread while holding Python's lock; a
    worker still freeing the last collective's tensors waited for that lock, and the rank hung
    forever, about 1 run in 20. The group must live until os._exit, and the ranks end at once."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(EXIT_PROBE)
    run = make_run("finetune", overrides=[*SMALL, "train.max_steps=2", "train.eval_every_steps=100"])
    cmd = runner_command(run, 2)
    env = os.environ | cmd.env | {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "ranks.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not run.metrics_file.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            code = proc.wait(timeout=60)  # a clean end takes seconds
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
            proc.wait()
            raise AssertionError(
                f"the ranks did not exit within 60 s of metrics.json\n{log.read_text()[-3000:]}"
            ) from None
    assert code == 0, log.read_text()[-3000:]
    ends = re.findall(r"process group at exit: (\w+)", log.read_text())
    assert ends == ["alive", "alive"], log.read_text()[-3000:]
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()


# --- outputs --------------------------------------------------------------------------------------

RUN_UMASK = 0o027


@pytest.mark.slow
def test_every_file_of_the_run_is_readable_as_the_umask_says(uninterrupted):
    """On shared storage colleagues read results as the umask allows: no 0600 files from temp names."""
    modes = {
        str(p.relative_to(uninterrupted.path)): p.stat().st_mode & 0o777
        for p in uninterrupted.path.rglob("*")
        if p != uninterrupted.spec_file
    }  # the test wrote that one
    assert {"metrics.json", "adapter/adapter_model.safetensors", "loss_curve.png"} <= set(modes)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o777 if Path(uninterrupted.path / name).is_dir() else 0o666) & ~RUN_UMASK
    }
    assert not wrong


@pytest.mark.slow
def test_the_run_writes_metrics_and_a_loss_curve(uninterrupted):
    metrics = json.loads(uninterrupted.metrics_file.read_text())
    assert metrics["steps"] == 12 and metrics["world_size"] == 1
    assert metrics["val_loss_last"] < metrics["val_loss_first"]
    steps = [row for row in rows(uninterrupted) if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, 13))
    assert [row["step"] for row in rows(uninterrupted) if "val_loss" in row] == [0, 5, 10, 12]
    assert (uninterrupted.path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_adapter_loads_in_peft_and_matches_the_merged_weights(uninterrupted):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmbatch.spec import load_resolved

    base_path = load_resolved(uninterrupted.spec_file).model.path
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in uninterrupted.adapter_dir.iterdir()}
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), uninterrupted.adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(uninterrupted.path / "merged")
    input_ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(tuned(input_ids).logits, merged(input_ids).logits, atol=1e-4)
        with tuned.disable_adapter():
            assert not torch.allclose(tuned(input_ids).logits, merged(input_ids).logits, atol=1e-2)


@pytest.mark.slow
def test_the_infer_runner_uses_the_adapter_and_scores_higher(uninterrupted, make_run):
    """The adapter as model.adapter of an infer spec, on the test split, against the base model."""
    accuracy = {}
    for adapter in ("null", str(uninterrupted.adapter_dir)):
        run = make_run("infer", overrides=["data.max_inputs=40", f"model.adapter={adapter}"])
        launch(run)
        accuracy[adapter] = json.loads(run.metrics_file.read_text())["accuracy"]
    assert accuracy[str(uninterrupted.adapter_dir)] > accuracy["null"], accuracy


# --- best adapter, early stopping, trackers -------------------------------------------------------

# A constant, large learning rate makes the validation loss jump around on the embedded model: its best
# evaluation (step 2) comes before the stop at step 5, and three worse ones end the run at step 8. So a
# resumed run that forgot the best loss, or the evaluations since, would pick another adapter-best or
# stop at another step.
BEST = [
    *SMALL,
    "train.eval_every_steps=2",
    "train.learning_rate=0.02",
    "train.lr_schedule=constant",
    "train.early_stopping_patience=3",
]


@pytest.fixture(scope="module")
def best_reference(tmp_path_factory, model_dir):
    run = new_run(tmp_path_factory.mktemp("best-reference"), model_dir, "finetune", BEST)
    finetune(run)
    return run


@pytest.fixture(scope="module")
def best_resumed(tmp_path_factory, model_dir):
    """BEST with TensorBoard, stopped at step 5; its step-5 checkpoint is then deleted, as if the attempt
    had died after logging step 5 but before saving it, so the resumed attempt logs step 5 again."""
    run = new_run(
        tmp_path_factory.mktemp("best-resumed"), model_dir, "finetune", [*BEST, "train.report_to=tensorboard"]
    )
    stopped = finetune(run, 1, 0, "--stop-at-step", "5", expect_success=False)
    assert stopped.returncode != 0 and f"exiting {PREEMPTED_EXIT}" in stopped.stdout, stopped.stdout[-3000:]
    assert checkpoint_names(run) == ["step-000004", "step-000005"]
    assert (run.adapter_best_dir / "adapter_model.safetensors").exists()  # from the evaluation at step 2
    shutil.rmtree(run.checkpoints_dir / "step-000005")
    assert "resuming at step 4" in finetune(run, 1, 1).stdout
    return run


@pytest.mark.slow
def test_the_best_adapter_is_kept_and_early_stopping_ends_the_run(best_reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmbatch.spec import load_resolved
    from llmbatch.summary import summarize

    evals = {row["step"]: row["val_loss"] for row in rows(best_reference) if "val_loss" in row}
    best_step = min(evals, key=evals.get)
    metrics = json.loads(best_reference.metrics_file.read_text())
    assert (metrics["best_step"], metrics["val_loss_best"]) == (best_step, evals[best_step])
    # Three evaluations without improvement after the best, then the run ends early.
    assert list(evals) == [0, 2, 4, 6, 8] and best_step == 2
    assert metrics["steps"] == 8 and metrics["stopped_early"] is True
    summary = summarize(best_reference)
    assert "best eval's step" in summary
    assert re.search(rf"^  adapter-best +{re.escape(str(best_reference.adapter_best_dir))}$", summary, re.M)
    base_path = load_resolved(best_reference.spec_file).model.path
    best = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), best_reference.adapter_best_dir)
    last = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), best_reference.adapter_dir)
    input_ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert not torch.allclose(best(input_ids).logits, last(input_ids).logits, atol=1e-3)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_same_best_adapter_and_stops_at_the_same_step(best_reference, best_resumed):
    assert (best_resumed.adapter_best_dir / "adapter_model.safetensors").read_bytes() == (
        best_reference.adapter_best_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert (best_resumed.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        best_reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
    assert trajectory(best_resumed) == trajectory(best_reference)
    keys = ("steps", "best_step", "val_loss_best", "stopped_early")
    resumed, reference = (json.loads(run.metrics_file.read_text()) for run in (best_resumed, best_reference))
    assert [resumed[k] for k in keys] == [reference[k] for k in keys]


@pytest.mark.slow
def test_tensorboard_holds_the_logged_metrics_once_per_step_across_a_resume(best_resumed):
    """The event files read back hold train_metrics.jsonl's numbers (as float32, TensorBoard's scalar
    type) at the same steps, each step once although two attempts logged step 5."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(best_resumed.tensorboard_dir))
    events.Reload()
    assert len(list(best_resumed.tensorboard_dir.glob("events.out.tfevents.*"))) == 2  # one per attempt
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        logged = [(row["step"], row[key]) for row in rows(best_resumed) if key in row]
        scalars = [(e.step, e.value) for e in events.Scalars(key)]
        assert scalars == [(step, float(np.float32(value))) for step, value in logged], key
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_early_stopping_needs_validation_data_and_a_tracker_its_package(monkeypatch, tmp_path, capsys):
    from llmbatch.cli import main
    from llmbatch.spec import SpecError, load_spec

    with pytest.raises(
        SpecError,
        match=r"^--set train.early_stopping_patience=2: train.early_stopping_patience: "
        r"needs data.val_path",
    ):
        load_spec(JOBS / "finetune.yaml", "finetune", ["data.val_path=null", "train.early_stopping_patience=2"])
    load_spec(JOBS / "finetune.yaml", "finetune", ["train.report_to=tensorboard"])  # installed for the tests
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(
        SpecError,
        match=r"train.report_to: tensorboard needs the tensorboard package, which is "
        r"not installed here \(pip install tensorboard, or llmbatch\[tensorboard\]\)$",
    ):
        load_spec(JOBS / "finetune.yaml", "finetune", ["train.report_to=tensorboard"])
    # The command: one line, exit 2, no run folder.
    assert (
        main(
            [
                "finetune",
                "--set",
                "train.report_to=tensorboard",
                "--output",
                str(tmp_path / "runs"),
                "--executor",
                "local",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.splitlines() == [
        "llmbatch: error: --set train.report_to=tensorboard: train.report_to: tensorboard needs the tensorboard "
        "package, which is not installed here (pip install tensorboard, or llmbatch[tensorboard])"
    ]
    assert not (tmp_path / "runs").exists()
    # In a container the image must have it; nothing to check on the submitting machine.
    load_spec(
        JOBS / "finetune.yaml",
        "finetune",
        ["train.report_to=tensorboard", "container.runtime=docker", "container.image=llmbatch:latest"],
    )
    with pytest.raises(
        SpecError,
        match=r"train.report_to: must be 'none' or 'tensorboard' or 'mlflow' or 'wandb', "
        r"got 'comet'",
    ):
        load_spec(JOBS / "finetune.yaml", "finetune", ["train.report_to=comet"])


def test_liger_stays_off_on_cpu_and_the_fused_path_equals_the_plain_loss(model_dir):
    """Liger-Kernel's kernels need CUDA, so on CPU the plain path is chosen. The fused path's part that
    is ours (the last hidden state at the target positions, the head's weight) is checked here with a
    plain linear cross-entropy in the kernel's place. The kernels themselves run only on a GPU:
    bench/check_finetune_gpu.py compares them with this plain path there (a GPU stands in for nothing
    here, so that check is not a CPU test)."""
    from transformers import AutoModelForCausalLM

    from llmbatch.runners.lora import HeadLoss, token_loss_sum, use_liger_kernels
    from llmbatch.spec import TrainSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert use_liger_kernels(TrainSpec(liger="auto"), model, torch.device("cpu")) is False

    def plain_linear_cross_entropy(weight, hidden, targets, bias):
        return torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 250, (2, 16), generator=generator)
    targets = torch.full_like(input_ids, IGNORE)
    targets[0, 6:10], targets[1, 9:14] = input_ids[0, 7:11], input_ids[1, 10:15]
    batch = {"input_ids": input_ids, "position_ids": torch.arange(16).repeat(2, 1), "targets": targets}
    head_loss = HeadLoss(model, plain_linear_cross_entropy)
    assert token_loss_sum(model, batch, head_loss).item() == pytest.approx(
        token_loss_sum(model, batch).item(), rel=1e-6
    )
    assert head_loss.hidden is None  # nothing held between calls
    model.generate(input_ids[:, :4], max_new_tokens=2, do_sample=False)
    assert head_loss.hidden is None  # and nothing from generation


# --- FSDP and QLoRA -------------------------------------------------------------------------------


def test_nf4_is_refused_for_inference_without_bitsandbytes_and_without_a_gpu(monkeypatch, tmp_path, capsys):
    """Every refusal of model.quantization: one line, exit 2, nothing queued."""
    from llmbatch.cli import main

    def refusal(kind: str, *sets: str) -> str:
        args = [kind, "--output", str(tmp_path / "runs"), "--executor", "local"]
        assert main(args + [a for s in sets for a in ("--set", s)]) == 2
        assert not (tmp_path / "runs").exists()
        [line] = capsys.readouterr().err.splitlines()
        return line

    assert refusal("infer", "model.quantization=nf4") == (
        "llmbatch: error: --set model.quantization=nf4: model.quantization: nf4 is for fine-tuning (QLoRA); "
        "inference loads the weights in model.dtype (a QLoRA run's adapter loads on the unquantized base): drop it"
    )
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (it is not, here; to be sure)
    assert refusal("finetune", "model.quantization=nf4") == (
        "llmbatch: error: --set model.quantization=nf4: model.quantization: nf4 needs the bitsandbytes package, "
        "which is not installed here (pip install llmbatch[quantization])"
    )
    # Installed (a stand-in: only its presence is checked before queueing), but this machine has no GPU.
    installed = types.ModuleType("bitsandbytes")
    installed.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", installed)
    assert refusal("finetune", "model.quantization=nf4", "train.sharding=fsdp") == (
        "llmbatch: error: model.quantization: nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels), and this "
        "machine, where the local executor runs the job, has none (use --executor slurm, or model.quantization: none)"
    )
    assert refusal("finetune", "train.sharding=zero3").endswith("train.sharding: must be 'ddp' or 'fsdp', got 'zero3'")


FSDP_TEST = ["train.max_steps=8", "train.eval_accuracy=true", "generation.max_new_tokens=4", "train.merge=true"]
"""8 steps, evaluations at 5 and 8 with greedy answers (short ones: the parity task answers in a word)."""


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory, model_dir):
    """The same 8 steps on 2 processes, under DDP and under FSDP (real `accelerate launch`, gloo)."""
    overrides = [*SMALL, *FSDP_TEST]
    runs = {}
    for sharding in ("ddp", "fsdp"):
        run = new_run(
            tmp_path_factory.mktemp(sharding), model_dir, "finetune", [*overrides, f"train.sharding={sharding}"]
        )
        finetune(run, 2)
        runs[sharding] = run
    return runs


@pytest.mark.slow
def test_fsdp_and_ddp_give_the_same_losses_and_adapters(ddp_and_fsdp):
    ddp, fsdp = (rows(ddp_and_fsdp[k]) for k in ("ddp", "fsdp"))
    losses = {k: [r["loss"] for r in rows(ddp_and_fsdp[k]) if "loss" in r] for k in ("ddp", "fsdp")}
    assert len(losses["fsdp"]) == 8
    for a, b in zip(losses["ddp"], losses["fsdp"]):
        assert abs(a - b) <= 0.02 * abs(a), losses
    val = {k: [r["val_loss"] for r in rows(ddp_and_fsdp[k]) if "val_loss" in r] for k in ("ddp", "fsdp")}
    assert len(val["fsdp"]) == len(val["ddp"]) >= 2
    for a, b in zip(val["ddp"], val["fsdp"]):
        assert abs(a - b) <= 0.02 * abs(a), val
    assert [r.get("val_accuracy") for r in ddp if "val_loss" in r] == [
        r.get("val_accuracy") for r in fsdp if "val_loss" in r
    ]
    # The adapter holds the whole LoRA weights (gathered from both ranks), in peft's format.
    from safetensors.torch import load_file

    tensors = {k: load_file(ddp_and_fsdp[k].adapter_dir / "adapter_model.safetensors") for k in ("ddp", "fsdp")}
    assert tensors["ddp"].keys() == tensors["fsdp"].keys()
    for name, weight in tensors["ddp"].items():
        assert weight.shape == tensors["fsdp"][name].shape
        torch.testing.assert_close(tensors["fsdp"][name], weight, rtol=0.02, atol=2e-4)
    assert (ddp_and_fsdp["fsdp"].adapter_best_dir / "adapter_model.safetensors").is_file()
    assert (ddp_and_fsdp["fsdp"].merged_dir / "config.json").is_file()


@pytest.mark.slow
def test_the_fsdp_adapter_loads_in_an_inference_spec(ddp_and_fsdp, make_run):
    """The FSDP run's adapter through the infer runner, as a user's inference spec names it: the same
    results as the DDP run's adapter."""
    results = {}
    for sharding, run in ddp_and_fsdp.items():
        infer_run = make_run("infer", overrides=["data.max_inputs=12", f"model.adapter={run.adapter_dir}"])
        results[sharding] = [json.loads(line)["output"] for line in infer(infer_run, 1).splitlines()]
    assert results["fsdp"] == results["ddp"]


@pytest.mark.slow
def test_an_fsdp_run_stopped_and_resumed_matches_an_uninterrupted_one(ddp_and_fsdp, make_run):
    """Preempted at step 4 and resumed: the losses of the uninterrupted FSDP run, the same adapter.

    Checkpoints hold the LoRA weights and AdamW state gathered whole, so the resumed ranks shard them
    again as they load."""
    reference = ddp_and_fsdp["fsdp"]
    overrides = [*SMALL, *FSDP_TEST, "train.sharding=fsdp"]
    run = make_run("finetune", overrides=overrides)
    stopped = finetune(run, 2, 0, "--stop-at-step", "4", expect_success=False)
    assert f"exiting {PREEMPTED_EXIT}" in stopped.stdout, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    from safetensors.torch import load_file

    # The LoRA weights and their AdamW state, whole; no weight of a decoder block of the base model.
    weights = load_file(run.checkpoints_dir / "step-000004" / "model.safetensors")
    optimizer = torch.load(run.checkpoints_dir / "step-000004" / "optimizer.bin", weights_only=True)
    lora = {name for name in weights if ".lora_" in name}
    assert len(lora) == 56 and set(optimizer["state"]) == lora
    assert lora == set(weights)
    resumed = finetune(run, 2, 1)
    assert "resuming at step 4" in resumed.stdout
    assert trajectory(run) == trajectory(reference)
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        reference.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
