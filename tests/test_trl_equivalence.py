"""Notebook 09's claim: the plain transformers + peft + bitsandbytes + TRL recipe and qlora_lab.train.finetune,
given the same conversations, order, seeds and hyper-parameters, train the same adapter.

A 2-block cut of the embedded model keeps it fast. The plain side is written exactly as in the notebook.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab import chat_data, data, models, train

LAYERS, STEPS, MAX_LENGTH = 2, 3, 192
TEMPLATE = ("{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}{{ '### Human: ' + m['content'] }}"
            "{% else %}{{ '### Assistant:' }}{% generation %}{{ ' ' + m['content'] }}"
            "{% if loop.last %}{{ eos_token }}{% endif %}{% endgeneration %}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}")
HYPER = dict(lr=1e-3, batch=4, r=16, alpha=16, dropout=0.05, seed=0, data_seed=42)


@pytest.fixture(scope="module")
def setup():
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    path = str(models.embedded_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE  # SmolLM2's tokenizer adds no BOS
    everything = chat_data.load_chat("embedded").conversations
    conversations = sorted(everything, key=lambda c: len(chat_data.messages_to_guanaco_text(c)))[:16]  # short: fast
    assert any(len(c) == 4 for c in conversations)  # a two-turn conversation is among them
    return path, tokenizer, conversations


def plain_recipe(path, tokenizer, conversations, out):
    """Notebook 09's recipe on a cut model: returns the trainer (adapter saved in out/adapter)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    set_seed(HYPER["seed"])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32,
                                                 device_map="cpu", num_hidden_layers=LAYERS)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=HYPER["dropout"],
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    args = SFTConfig(output_dir=str(out / "plain"), max_steps=STEPS, per_device_train_batch_size=HYPER["batch"],
                     learning_rate=HYPER["lr"], lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=0.3,
                     weight_decay=0.0, adam_beta2=0.999, train_sampling_strategy="group_by_length",
                     assistant_only_loss=True, max_length=MAX_LENGTH, gradient_checkpointing=False, bf16=False,
                     use_cpu=True, seed=HYPER["seed"], data_seed=HYPER["data_seed"], logging_steps=1, save_strategy="no",
                     report_to=[], disable_tqdm=True)
    train_set = Dataset.from_list([{"messages": m} for m in conversations])
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer)
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return trainer


def qlora_lab_run(path, tokenizer, conversations, out):
    """The same run through qlora_lab.train.finetune, fed the conversations as OASST1 rows."""
    rows = chat_data.write_jsonl(chat_data.to_oasst_rows(conversations), out / "oasst.jsonl")
    config = train.FinetuneConfig(
        model_name_or_path=path, dataset=str(rows), output_dir=str(out / "qlora_lab"), compute_dtype="float32",
        lora_r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=HYPER["dropout"], optim="adamw_torch",
        learning_rate=HYPER["lr"], per_device_train_batch_size=HYPER["batch"], gradient_accumulation_steps=1,
        max_steps=STEPS, max_length=MAX_LENGTH, truncation="tokens", group_by_length=True, train_on="assistant",
        gradient_checkpointing=False, seed=HYPER["seed"], data_seed=HYPER["data_seed"], logging_steps=1,
        eval_steps=1000, save_steps=1000)
    base = models.load_model(path, quantization="nf4", compute_dtype=torch.float32, num_hidden_layers=LAYERS)
    return train.finetune(config, model=base, tokenizer=tokenizer, progress=False)


def delta_w(folder):
    """(alpha/r) B A of every adapted layer: the change an adapter makes to the model."""
    t = load_file(str(folder / "adapter_model.safetensors"))
    return {k: HYPER["alpha"] / HYPER["r"] * (t[k.replace("lora_A", "lora_B")] @ t[k]).double()
            for k in t if "lora_A" in k}


def relative(a, b):
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(b[k].norm() ** 2) for k in b)) ** 0.5


def test_same_tokens_and_labels_as_guanaco_collator(setup):
    _, tokenizer, conversations = setup
    collator = data.GuanacoCollator(tokenizer, max_length=4096, train_on="assistant")
    for messages in chat_data.load_chat("embedded").conversations:  # all 40, Korean and two-turn ones included
        enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = collator.encode(chat_data.messages_to_guanaco_text(messages))
        assert list(enc["input_ids"]) == ids
        assert [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])] == labels


def test_plain_recipe_equals_qlora_lab_train(setup, tmp_path):
    path, tokenizer, conversations = setup
    trainer = plain_recipe(path, tokenizer, conversations, tmp_path / "a")
    result = qlora_lab_run(path, tokenizer, conversations, tmp_path / "b")
    plain_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ql_losses = [h["loss"] for h in result.loss_history]
    assert len(plain_losses) == len(ql_losses) == STEPS
    assert max(abs(a - b) / b for a, b in zip(plain_losses, ql_losses)) < 1e-3
    same = relative(delta_w(tmp_path / "a" / "adapter"), delta_w(result.adapter_path))
    assert same < 0.05, same
    # Negative control: the same conversations in another order make a different run, far outside that tolerance.
    other = qlora_lab_run(path, tokenizer, conversations[::-1], tmp_path / "c")
    different = relative(delta_w(other.adapter_path), delta_w(result.adapter_path))
    print(f"plain vs qlora_lab {same:.2e}; another order {different:.2e}")
    assert different > 5 * 0.05, different
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_fused_loss_head_matches_cross_entropy(setup):
    """The one computation that differs: TRL's fused LM head against transformers' cross-entropy."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    path, tokenizer, conversations = setup
    torch.manual_seed(0)
    model = models.load_model(path, quantization="nf4", compute_dtype=torch.float32, num_hidden_layers=LAYERS)
    add_fused_lm_head(model, outputs=("log_probs",))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # a non-zero adapter, so every LoRA matrix gets a gradient
    batch = data.GuanacoCollator(tokenizer, max_length=MAX_LENGTH)(
        [chat_data.messages_to_guanaco_text(c) for c in conversations[:4]])
    n = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    results = []
    for fused in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout draw both times
        if fused:
            loss = -model(**batch, fused_lm_head=True).log_probs.sum() / n
        else:
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (l1, g1), (l2, g2) = results
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    rel = float((g1 - g2).norm() / g1.norm())
    assert 0 <= rel < 1e-4, rel  # rounding only
