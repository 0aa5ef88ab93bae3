"""The memory estimator: published sizes, hand-computed cases, bitsandbytes' real byte counts, and measurement."""

import math

import pytest
import torch

from qlora_lab import measure, memory
from qlora_lab.models import random_llama

# Parameter counts of the released checkpoints (Hugging Face model cards / config.json of each).
PUBLISHED_PARAMS = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama-2-70b": 68_976_648_192,
}


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_have_the_published_parameter_counts(name):
    assert memory.architecture(name).params == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("tied", [False, True])
def test_architecture_counts_equal_a_real_transformers_model(tied):
    from transformers import LlamaForCausalLM

    config = tiny_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    arch = memory.architecture(model)
    assert arch == memory.architecture(config)
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert (arch.kv_heads, arch.head_dim, arch.tied_embeddings) == (2, 16, tied)


def test_full_finetune_by_hand():
    # tiny model: h=64, m=160, 2 layers, 4 heads of 16, 2 KV heads, vocab 100, untied
    arch = memory.architecture(tiny_config())
    linear = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 160)  # q, k, v, o, gate/up/down
    other = 2 * 100 * 64 + (2 * 2 + 1) * 64
    assert (arch.linear_params, arch.other_params) == (linear, other)
    n = linear + other
    est = memory.estimate_training_memory(arch, "full", batch_size=2, seq_len=8)
    assert (est.weights, est.gradients, est.optimizer_state) == (2 * n, 2 * n, 8 * n)
    mixed = memory.estimate_training_memory(arch, "full", batch_size=2, seq_len=8, master_weights=True)
    assert mixed.optimizer_state == 12 * n
    # activations per token of one block in full fine-tuning (bf16 = 2 bytes):
    norms = 2 * (4 * 64 + 4 + 2 * 64)          # float32 input copy + rsqrt, and the normalised input
    sdpa = 2 * (64 + 32 + 32 + 64) + 4 * 4     # q, k, v, output + float32 log-sum-exp per head
    mlp = 3 * 2 * 160                          # gate output, silu(gate), up
    inputs = 2 * (64 + 64 + 64 + 160)          # each linear keeps its input for its weight gradient
    layer = norms + sdpa + mlp + inputs
    assert layer == 2840
    tokens, head = 16, 12 * 100                # the loss head: 12 bytes x vocab per token
    recompute = layer + 2 * 2 * 160             # one block recomputed + two m-wide gradients
    assert est.activations == 2 * 64 * 2 * tokens + max(head, recompute) * tokens
    flat = memory.estimate_training_memory(arch, "full", batch_size=2, seq_len=8, gradient_checkpointing=False)
    assert flat.activations == (2 * layer + head) * tokens
    assert est.total == sum(getattr(est, c) for c in memory.MemoryBreakdown.COMPONENTS)


def test_lora_and_qlora_by_hand():
    arch = memory.architecture(tiny_config())
    r = 4
    lora = 2 * r * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 160) + (160 + 64))
    est = memory.estimate_training_memory(arch, "lora", lora_r=r, seq_len=8)
    assert (est.lora_weights, est.gradients, est.optimizer_state) == (2 * lora, 2 * lora, 8 * lora)
    assert est.weights == 2 * arch.params
    q = memory.estimate_training_memory(arch, "qlora", lora_r=r, seq_len=8)
    packed = sum(2 * (i * o) // 2 for i, o in arch.linear_shapes().values())
    consts = sum(2 * (math.ceil(i * o / 64) + 4 * math.ceil(math.ceil(i * o / 64) / 256) + 4)
                 for i, o in arch.linear_shapes().values())
    assert (q.weights, q.quant_constants) == (packed + 2 * arch.other_params, consts)
    only_qv = memory.estimate_training_memory(arch, "lora", lora_r=r, lora_targets=["q_proj", "v_proj"])
    assert only_qv.lora_weights == 2 * 2 * r * ((64 + 64) + (64 + 32))


def test_nf4_bytes_match_the_paper_and_bitsandbytes():
    # a 4096 x 4096 weight with double quantization (notebook 03): 8,388,608 + 262,144 + 4,096 + 4 bytes
    assert memory.nf4_bytes(4096 * 4096, True) == (8_388_608, 262_144 + 4_096 + 4)
    assert memory.nf4_bytes(4096 * 4096, False) == (8_388_608, 1_048_576)
    import bitsandbytes.functional as F

    w = torch.randn(300, 257)  # a size that is not a multiple of the block
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    from qlora_lab.models import quant_state_bytes

    assert memory.nf4_bytes(w.numel(), True) == (packed.numel(), quant_state_bytes(state))


@pytest.mark.parametrize("optimizer", sorted(memory.OPTIMIZER_STATE))
def test_optimizer_state_equals_bitsandbytes(optimizer):
    sizes = [300_000, 100, 5_000, 4_095, 4_096, 257]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = measure.make_optimizer(params, optimizer)
    for p in params:
        p.grad = torch.zeros_like(p)
    measure.optimizer_step(opt)
    total, pageable = memory.optimizer_state_bytes(sizes, optimizer)
    assert total == measure.tensor_bytes(measure.optimizer_state_tensors(opt))
    fresh = measure.make_optimizer(params, optimizer)
    measure.allocate_optimizer_state(fresh)  # the same allocation without the update
    assert total == measure.tensor_bytes(measure.optimizer_state_tensors(fresh))
    bits, paged = memory.OPTIMIZER_STATE[optimizer]
    assert pageable == ((8 if bits == 32 else 2) * 300_000 if paged else 0)


def test_paper_scale_numbers():
    q65 = memory.estimate_training_memory("llama-65b", "qlora", optimizer="paged_adamw")
    assert q65.total < 48e9
    full65 = memory.estimate_training_memory("llama-65b", "full")
    assert abs(full65.total / 780e9 - 1) < 0.03
    # the paper's "LoRA parameters: 26 MB" is 0.2% of the 7B weights in 16 bits, in MiB
    assert round(0.002 * memory.architecture("llama-7b").params * 2 / 2**20) == 26


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="llama-8b"), "Unknown model preset"),
    (dict(method="prefix"), "method="),
    (dict(optimizer="sgd"), "optimizer="),
    (dict(lora_targets=["qkv"]), "lora_targets"),
    (dict(lora_r=0), "lora_r=0"),
    (dict(lora_r=100000), "lora_r=100000"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(seq_len=-1), "seq_len=-1"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(lora_dropout=1.5), "lora_dropout"),
])
def test_estimator_errors_name_the_bad_value(kwargs, match):
    args = dict(model="llama-7b", method="lora")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        memory.estimate_training_memory(args.pop("model"), args.pop("method"), **args)


def test_architecture_error_lists_what_is_accepted():
    with pytest.raises(ValueError, match="hidden_size"):
        memory.architecture(object())


# ----------------------------------------------------------------------------------- measurement (embedded)

@pytest.fixture(scope="module")
def models():
    from qlora_lab.models import load_model

    return {m: load_model(quantization="nf4" if m == "qlora" else None) for m in memory.ESTIMATOR_METHODS}


@pytest.mark.parametrize("method", memory.ESTIMATOR_METHODS)
def test_estimate_within_15_percent_of_measurement(models, method):
    model = measure.prepare_for_training(models[method], method)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    measured = measure.measure_training_memory(model, ids)
    est = memory.estimate_training_memory(model, method, batch_size=1, seq_len=64)
    # counted things are exact (measured weights also hold RoPE's two inv_freq buffers: 256 bytes)
    for part in ("weights", "quant_constants", "lora_weights", "gradients", "optimizer_state"):
        assert getattr(est, part) == pytest.approx(getattr(measured, part), abs=512), part
    assert abs(est.activations / measured.activations - 1) < 0.15
    assert abs(est.total / measured.total - 1) < 0.15
    assert measured.activations > 0 and measured.total > measured.weights


def test_measurement_and_preparation_errors(models):
    with pytest.raises(ValueError, match="no trainable parameters"):
        measure.measure_training_memory(torch.nn.Linear(2, 2).requires_grad_(False), torch.zeros(1, 2).long())
    with pytest.raises(ValueError, match="qlora needs"):
        measure.prepare_for_training(models["full"], "qlora")
    with pytest.raises(ValueError, match="not in the model"):
        measure.prepare_for_training(models["qlora"], "qlora", lora_targets=["c_attn"])
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="batch is empty"):
        measure.measure_training_memory(lin, torch.zeros(1, 0).long())


def test_random_llama_round_trip_matches_its_preset(tmp_path):
    arch = memory.Architecture("tiny", 64, 160, 2, 4, 2, 16, 128)
    model = random_llama(arch, tmp_path / "tiny", quantization="nf4")
    assert getattr(model, "is_loaded_in_4bit", False)
    est = memory.estimate_training_memory(arch, "qlora", lora_r=8)
    measured = measure.parameter_bytes(model)
    assert measured["quant_constants"] == est.quant_constants
    assert measured["weights"] == pytest.approx(est.weights, abs=512)  # + RoPE inv_freq buffers
    assert memory.architecture(model).params == arch.params


@pytest.mark.parametrize("method, dropout", [("full", 0.0), ("qlora", 0.0), ("lora", 0.1)])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_block_formula_where_the_loss_head_does_not_dominate(tmp_path, method, dropout, checkpointing):
    """A small vocabulary makes the recomputed block (or all blocks) set the peak, not the loss head."""
    arch = memory.Architecture("small-vocab", 384, 1024, 3, 6, 6, 64, 300)
    model = random_llama(arch, tmp_path / method, quantization="nf4" if method == "qlora" else None)
    train = measure.prepare_for_training(model, method, lora_r=16, lora_dropout=dropout,
                                        gradient_checkpointing=checkpointing)
    ids = torch.randint(0, arch.vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    measured = measure.measure_training_memory(train, ids)
    est = memory.estimate_training_memory(arch, method, batch_size=4, seq_len=128, lora_r=16,
                                          lora_dropout=dropout, gradient_checkpointing=checkpointing)
    assert est.activations > 12 * arch.vocab * 512  # the block term, not the head, is the peak here
    assert abs(est.activations / measured.activations - 1) < 0.15
    assert abs(est.total / measured.total - 1) < 0.15


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_r": 8.5}, r"lora_r=8.5 is not allowed: a whole number >= 1"),
    ({"lora_r": 0}, r"lora_r=0 is not allowed"),
    ({"gradient_checkpointing": "false"}, r"gradient_checkpointing='false' is not allowed: True or False"),
    ({"double_quant": 1}, r"double_quant=1 is not allowed"),
    ({"batch_size": True}, r"batch_size=True is not allowed"),
])
def test_numbers_and_flags_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.estimate_training_memory("llama-7b", "qlora", **kwargs)

# ------------------------------------------------------------------------ several GPUs: DDP, FSDP, offload
def test_one_gpu_defaults_leave_every_result_unchanged():
    for method in memory.ESTIMATOR_METHODS:
        plain = memory.estimate_training_memory("llama-7b", method)
        same = memory.estimate_training_memory("llama-7b", method, world_size=1, sharding="none", cpu_offload=False)
        assert same.as_dict() == plain.as_dict() and same.assumptions == plain.assumptions
        assert "cpu_offloaded" not in plain.as_dict()


def test_ddp_keeps_everything_and_adds_gradient_buckets():
    one = memory.estimate_training_memory("llama-7b", "qlora")
    ddp = memory.estimate_training_memory("llama-7b", "qlora", world_size=4)
    assert ddp.gradients == 2 * one.gradients
    assert ddp.total == one.total + one.gradients
    assert (ddp.weights, ddp.optimizer_state, ddp.activations) == (one.weights, one.optimizer_state, one.activations)


def test_fsdp_full_shard_by_hand():
    arch = memory.architecture(tiny_config())
    one = memory.estimate_training_memory(arch, "qlora", lora_r=4)
    est = memory.estimate_training_memory(arch, "qlora", lora_r=4, world_size=4, sharding="fsdp_full_shard")
    # one FSDP unit per block: its NF4 codes + constants and 2 bf16 norms; the root: embeddings, head, final norm
    block = sum(sum(memory.nf4_bytes(i * o)) for i, o in arch.linear_shapes().values()) + 2 * 2 * 64
    root = 2 * (2 * 100 * 64 + 64)
    assert est.weights == one.weights / 4 + root + 2 * block
    for name in ("lora_weights", "gradients", "optimizer_state"):
        assert getattr(est, name) == getattr(one, name) / 4
    assert (est.quant_constants, est.activations) == (one.quant_constants, one.activations)
    off = memory.estimate_training_memory(arch, "qlora", lora_r=4, world_size=4, sharding="fsdp_full_shard",
                                          cpu_offload=True)
    shards = one.weights / 4 + one.lora_weights / 4 + one.gradients / 4 + one.optimizer_state / 4
    assert off.cpu_offloaded == shards and off.as_dict()["cpu_offloaded"] == shards
    assert off.total == one.quant_constants + root + 2 * block + one.activations


def test_fsdp_block_bytes_equal_bitsandbytes_packing():
    # the 4-bit part of one gathered unit is what bitsandbytes stores for the block's linear layers
    import bitsandbytes.functional as F

    arch = memory.architecture(tiny_config())
    packed = sum(F.quantize_4bit(torch.randn(o, i, dtype=torch.bfloat16), quant_type="nf4",
                                 quant_storage=torch.bfloat16)[0].numel() * 2
                 for i, o in arch.linear_shapes().values())
    assert packed == sum(memory.nf4_bytes(i * o)[0] for i, o in arch.linear_shapes().values())


def test_llama2_70b_two_gpus_stays_below_the_published_usage():
    # PEFT docs (accelerate/fsdp, accelerate/deepspeed): 19.6 GB/GPU with offload, 35.6 without, ZeRO-3 36.6.
    # The estimate counts live tensors only, so it must sit below each, by less than the runtime overhead.
    ref = dict(batch_size=2, seq_len=2048, lora_r=8, lora_dropout=0.1, world_size=2, sharding="fsdp_full_shard")
    for extra, published in (({"cpu_offload": True}, 19.6), ({}, 35.6), ({"master_weights": True}, 36.6)):
        total = memory.estimate_training_memory("llama-2-70b", "qlora", **ref, **extra).total / memory.GB
        assert published - 10 < total < published, (extra, total)


@pytest.mark.parametrize("kwargs, match", [
    ({"world_size": 0}, r"world_size=0 must be a positive integer"),
    ({"world_size": 2.0}, r"world_size=2.0 must be a positive integer"),
    ({"sharding": "zero2"}, r"sharding='zero2' is not one of \['none', 'fsdp_full_shard'\]"),
    ({"cpu_offload": True}, r"cpu_offload=True needs sharding='fsdp_full_shard'"),
])
def test_distribution_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory.estimate_training_memory("llama-7b", "qlora", **kwargs)
