"""qlora_lab.distributed: 2-process DDP QLoRA equals a 1-process run; FSDP + QLoRA invariants agree with real
FSDP; the launcher fails fast instead of hanging."""

import socket
import time
import warnings
from pathlib import Path

import pytest
import torch

from qlora_lab import distributed, launch, measure, memory, models

ROOT = Path(__file__).resolve().parent.parent
LAYERS, R = 2, 16
ARGS = ["--layers", str(LAYERS), "--steps", "2", "--global-batch", "4", "--seq-len", "32", "--lora-r", str(R)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2 steps on 2 processes (2 rows each) and on 1 process (the same two 2-row micro-batches)."""
    folder = tmp_path_factory.mktemp("distributed")
    two = launch.launch([*ARGS, "--out", str(folder / "two.json")], nproc=2, timeout=240, cpu=True)
    one = launch.launch([*ARGS, "--micro-batch", "2", "--out", str(folder / "one.json")], nproc=1,
                             threads=1, timeout=240, cpu=True)
    return folder, two, one


def test_two_processes_train_the_same_adapter_as_one(runs):
    folder, two, one = runs
    assert (two["world_size"], one["world_size"], two["backend"]) == (2, 1, "gloo")
    assert two["ranks_agree"] and one["ranks_agree"]
    a, b = (launch.adapter_tensors(folder / f"{n}.json") for n in ("two", "one"))
    # Same rows, same LoRA init, gradients averaged over equal-sized halves: bit for bit the same adapter.
    assert two["adapter_sha256"] == one["adapter_sha256"]
    assert launch.max_abs_diff(a, b) == 0.0
    assert two["losses"] == one["losses"]
    trained_b = [t for n, t in a.items() if "lora_B" in n]
    assert trained_b and all(t.abs().max() > 0 for t in trained_b), "LoRA B never left zero: nothing trained"


def test_accelerate_launch_without_a_config_runs_the_same_two_process_ddp(runs):
    folder, two, _ = runs
    cmd = launch.command(["--out", "x.json"], 2, 29500, "accelerate", cpu=True)
    assert "--multi_gpu" in cmd and "--cpu" not in cmd  # accelerate's --cpu would start one plain process
    acc = launch.launch([*ARGS, "--out", str(folder / "acc.json")], nproc=2, launcher="accelerate", timeout=240,
                        cpu=True)
    assert (acc["world_size"], acc["backend"]) == (2, "gloo")
    assert acc["adapter_sha256"] == two["adapter_sha256"]


def test_ddp_all_reduces_exactly_the_lora_gradients(runs):
    from transformers import AutoConfig

    _, two, _ = runs
    arch = memory.architecture(AutoConfig.from_pretrained(models.embedded_model_path(), num_hidden_layers=LAYERS))
    lora_values = sum(memory.lora_tensor_sizes(arch, R, memory.resolve_lora_targets(arch, "all-linear")))
    assert lora_values == LAYERS * R * 10_176 == two["trainable"]  # sum of in+out over the 7 linears: 10,176
    assert two["dtype"] == "float32"
    for step in two["comm_per_step"]:
        assert step["values"] == lora_values and step["bytes"] == 4 * lora_values


def test_rank_rows_concatenate_to_the_global_batch():
    rows = [distributed.rank_rows(3, r, 2, 4) for r in range(2)]
    assert [(s.start, s.stop) for s in rows] == [(12, 14), (14, 16)]
    with pytest.raises(ValueError, match="global batch 5 does not split evenly over 2"):
        distributed.rank_rows(0, 0, 2, 5)


def test_a_taken_port_is_refused_before_launch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.perf_counter()
        with pytest.raises(launch.PortInUseError, match=f"port {port} is already in use"):
            launch.launch(["--out", str(tmp_path / "x.json")], port=port)
        assert time.perf_counter() - start < 2


def test_a_dead_rank_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(launch.LaunchError, match=r"rank 1: stopping on purpose"):
        launch.launch([*ARGS, "--fail-rank", "1", "--out", str(tmp_path / "x.json")], timeout=120, cpu=True)


def test_timeout_stops_every_rank(tmp_path):
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match="no result after 2 s"):
        launch.launch([*ARGS, "--out", str(tmp_path / "x.json")], timeout=2, cpu=True)
    assert time.perf_counter() - start < 10
    import psutil

    time.sleep(0.5)
    left = [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert left == [], f"ranks {left} outlived the timeout"


def test_launch_and_script_reject_bad_values(tmp_path):
    out = ["--out", str(tmp_path / "x.json")]
    with pytest.raises(ValueError, match="launcher='mpirun' is not one of"):
        launch.launch(out, launcher="mpirun")
    with pytest.raises(ValueError, match="nproc=0 must be a positive integer"):
        launch.launch(out, nproc=0)
    with pytest.raises(ValueError, match="must contain --out"):
        launch.launch(["--steps", "1"])
    with pytest.raises(ValueError, match="--steps=0 must be >= 1"):
        distributed.parse_args([*out, "--steps", "0"])


# ------------------------------------------------------------------------------------------ FSDP + QLoRA
def qlora(storage=torch.bfloat16, lora_dtype=None):
    model = models.load_model(None, quantization="nf4", num_hidden_layers=LAYERS, quant_storage=storage)
    model = measure.prepare_for_training(model, "qlora", lora_r=8, gradient_checkpointing=False)
    return models.cast_trainable(model, lora_dtype) if lora_dtype is not None else model


def fsdp_wrap(model):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():  # one process: FSDP says it switches to NO_SHARD
        warnings.simplefilter("ignore", UserWarning)
        return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                    device_id=torch.device("cpu"))


def test_bf16_quant_storage_meets_the_invariants_and_real_fsdp_flattens_as_predicted():
    model = qlora(torch.bfloat16)
    assert distributed.fsdp_invariants(model, torch.bfloat16) == []
    packed = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer.weight
    assert packed.dtype == torch.bfloat16 and packed.numel() == 576 * 576 // 4  # 4 NF4 codes per bf16 element
    predicted = {unit: sorted(n for n, _ in ps) for unit, ps in distributed.flat_param_groups(model).items()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with distributed.single_process_group():
        wrapped = fsdp_wrap(model)
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        flat = [u._flat_param for u in units if u._flat_param is not None]
        assert len(flat) == len(predicted) == 1 + 2 * (1 + 7 * 2)  # root, 2 blocks, an A and a B per linear
        assert {f.dtype for f in flat} == {torch.bfloat16}
        real = sorted(len(f._fqns) for f in flat)
        assert real == sorted(len(v) for v in predicted.values())


def test_uint8_storage_breaks_the_invariants_and_real_fsdp_refuses():
    model = qlora(torch.uint8)
    problems = distributed.fsdp_invariants(model, torch.bfloat16)
    assert sum("4-bit codes stored as torch.uint8" in p for p in problems) == 7 * LAYERS
    assert any("one flat tensor cannot hold ['torch.bfloat16', 'torch.uint8']" in p for p in problems)
    with distributed.single_process_group(), pytest.raises(ValueError, match="Cannot flatten integer dtype tensors"):
        fsdp_wrap(model)


def test_lora_outside_the_compute_dtype_is_reported():
    problems = distributed.fsdp_invariants(qlora(torch.bfloat16, lora_dtype=torch.float32), torch.bfloat16)
    assert len(problems) == 2 * 7 * LAYERS
    assert all("trainable parameter in torch.float32" in p for p in problems)


def test_the_shipped_accelerate_config_sets_what_fsdp_qlora_needs():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs/fsdp_qlora.yaml"), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert distributed.fsdp_settings(env) == {"sharding_strategy": "FULL_SHARD", "use_orig_params": False,
                                              "offload_params": True, "cpu_ram_efficient_loading": True,
                                              "sync_module_states": True}
    assert distributed.fsdp_settings({}) == {**distributed.fsdp_settings(env), "offload_params": False,
                                             "cpu_ram_efficient_loading": False}
