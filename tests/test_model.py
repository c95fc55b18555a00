"""The assembled VLM: merge, trainable sets, save / load round trip, batched generation, projector."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import PATCHES, model_config
from vlmkit import VLM
from vlmkit.config import ConfigError, DataConfig, StageConfig
from vlmkit.data import collate
from vlmkit.registry import CONNECTORS, ENCODERS, TEMPLATES
from vlmkit.stages import apply_stage, format_table

COLORS = [(220, 40, 40), (40, 170, 60), (40, 80, 220)]


def sample(proc, question="What color is the shape?", answer="red", n_images=1, gen=False):
    imgs = [Image.new("RGB", (12 + 4 * k, 16), COLORS[k % 3]) for k in range(n_images)]
    conv = [{"from": "human", "value": "<image>\n" * n_images + question}]
    if not gen:
        conv.append({"from": "gpt", "value": answer})
    return proc(conv, imgs, add_generation_prompt=gen)


def batch_of(proc, samples, side="right"):
    return collate(samples, proc.tokenizer.pad_token_id, padding_side=side)


# ---- merge ----------------------------------------------------------------------------------------
def test_merge_places_features_in_order(vlm, processor):
    b = batch_of(processor, [sample(processor, n_images=2), sample(processor, "How many shapes are there?")])
    with torch.no_grad():
        embeds = vlm.embed(b["input_ids"], b["pixel_values"])
        feats = vlm.encode_images(b["pixel_values"])  # [3, P, D]
        tok = vlm.llm.get_input_embeddings()(b["input_ids"])
    mask = b["input_ids"] == vlm.image_token_id
    assert feats.shape == (3, PATCHES, vlm.llm.config.hidden_size)
    assert torch.equal(embeds[mask], feats.reshape(-1, feats.shape[-1]))
    assert torch.equal(embeds[~mask], tok[~mask])


@pytest.mark.parametrize("n_images,n_placeholders", [(1, PATCHES - 1), (2, PATCHES), (0, PATCHES), (1, 0)])
def test_merge_count_mismatch_raises(vlm, processor, n_images, n_placeholders):
    ids = sample(processor)["input_ids"]
    text = ids[ids != vlm.image_token_id]
    ids = torch.cat([text[:3], torch.full((n_placeholders,), vlm.image_token_id), text[3:]])[None]
    px = torch.randn(n_images, 3, vlm.encoder.image_size, vlm.encoder.image_size) if n_images else None
    with pytest.raises(ValueError) as ei:
        vlm.embed(ids, px)
    msg = str(ei.value)
    assert f"expected {n_images * PATCHES}" in msg and f"holds {n_placeholders} placeholder" in msg


# ---- stages ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_vlm(encoder_dirs, llm_dir):
    return VLM.from_config(model_config(encoder_dirs["clip"], llm_dir))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names_of(model, comp):
    return {f"{comp}.{n}" for n, _ in getattr(model, comp).named_parameters()}


def test_stage_connector_only(fresh_vlm):
    rows = apply_stage(fresh_vlm, {"connector": "full"})
    assert trainable(fresh_vlm) == names_of(fresh_vlm, "connector")
    assert names_of(fresh_vlm, "connector") == {"connector.linear_1.weight", "connector.linear_1.bias",
                                                "connector.linear_2.weight", "connector.linear_2.bias"}
    assert [(r["component"], r["mode"], r["trainable"] > 0) for r in rows] == \
        [("encoder", "frozen", False), ("connector", "full", True), ("llm", "frozen", False)]
    assert rows[1]["trainable"] == rows[1]["params"] == sum(p.numel() for p in fresh_vlm.connector.parameters())
    table = format_table(rows)
    assert "TRAINABLE" in table.splitlines()[2] and "Frozen" in table.splitlines()[1]


def test_stage_connector_and_llm(fresh_vlm):
    apply_stage(fresh_vlm, {"connector": "full"})
    apply_stage(fresh_vlm, {"connector": "full", "llm": "full"})  # a later stage unfreezes, never leaks
    assert trainable(fresh_vlm) == names_of(fresh_vlm, "connector") | names_of(fresh_vlm, "llm")
    assert not any(p.requires_grad for p in fresh_vlm.encoder.parameters())
    apply_stage(fresh_vlm, {"encoder": "full", "connector": "frozen"})
    assert trainable(fresh_vlm) == names_of(fresh_vlm, "encoder")
    # every parameter belongs to exactly one component
    assert names_of(fresh_vlm, "encoder") | names_of(fresh_vlm, "connector") | names_of(fresh_vlm, "llm") == \
        {n for n, _ in fresh_vlm.named_parameters()}


def test_frozen_encoder_gets_no_grad_but_connector_does(fresh_vlm, processor):
    apply_stage(fresh_vlm, {"connector": "full"})
    b = batch_of(processor, [sample(processor)])
    fresh_vlm.zero_grad()
    fresh_vlm(**b).backward()
    assert all(p.grad is None for p in fresh_vlm.encoder.parameters())
    assert all(p.grad is None for p in fresh_vlm.llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh_vlm.connector.parameters())
    fresh_vlm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("plan", [{}, {"connector": "frozen"}, {"encoder": "frozen", "llm": "frozen"}])
def test_stage_training_nothing_raises(fresh_vlm, plan):
    with pytest.raises(ValueError, match="trains nothing"):
        apply_stage(fresh_vlm, plan)


def test_stage_config_errors(fresh_vlm):
    data = DataConfig(path="x.json")
    with pytest.raises(ConfigError, match="mode 'bogus'"):
        StageConfig(name="s", train={"llm": "bogus"}, data=data)
    with pytest.raises(ConfigError, match="trains nothing"):
        StageConfig(name="s", train={"llm": "frozen"}, data=data)
    # the split of a global batch depends on the number of processes, so it is checked at run time
    from vlmkit.train import micro_batching

    assert micro_batching(32, 32, 2) == (16, 1) and micro_batching(128, 16, 2) == (16, 4)
    assert micro_batching(10, 4, 5) == (2, 1)
    with pytest.raises(ValueError, match="global_batch_size 10 cannot be split"):
        micro_batching(10, 4, 1)
    # an unknown component is refused by the config, or at the latest when the plan meets the model
    try:
        st = StageConfig(name="s", train={"vision": "full", "llm": "full"}, data=data)
    except ConfigError as e:
        assert "'vision'" in str(e) and "connector" in str(e)
    else:
        with pytest.raises((ValueError, KeyError), match="vision"):
            apply_stage(fresh_vlm, st.train)


# ---- save / load ----------------------------------------------------------------------------------
def logits_of(model, b):
    with torch.no_grad():
        return model.logits(b["input_ids"], b["attention_mask"], b["pixel_values"])


def test_save_load_roundtrip_tied(vlm, processor, tmp_path):
    assert vlm.llm.config.tie_word_embeddings
    b = batch_of(processor, [sample(processor), sample(processor, "How many shapes are there?", "two")])
    vlm.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["encoder"]["path"] is None and saved["model"]["llm"]["path"] is None
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"encoder", "connector", "llm"}

    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits_of(vlm, b), logits_of(loaded, b))
    emb, head = loaded.llm.get_input_embeddings().weight, loaded.llm.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # still tied after loading
    for (n, p), (n2, q) in zip(vlm.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n
    # the tokenizer: same vocabulary, specials, template and image token
    t1, t2 = vlm.tokenizer, loaded.tokenizer
    assert t1.get_vocab() == t2.get_vocab() and len(t1) == len(t2)
    assert (t1.pad_token_id, t1.bos_token_id, t1.eos_token_id) == (t2.pad_token_id, t2.bos_token_id, t2.eos_token_id)
    assert loaded.image_token_id == vlm.image_token_id and t1.chat_template == t2.chat_template
    text = "USER: <image> What color is the shape? ASSISTANT: red</s>"
    assert t1(text)["input_ids"] == t2(text)["input_ids"]
    s1, s2 = sample(processor), sample(loaded.processor())
    assert all(torch.equal(s1[k], s2[k]) for k in ("input_ids", "labels", "pixel_values"))
    assert loaded.encoder.mean == vlm.encoder.mean and loaded.encoder.image_size == vlm.encoder.image_size


def test_save_load_roundtrip_untied_without_source_dirs(encoder_dirs, llm_dir_untied, tmp_path):
    enc, llm = tmp_path / "enc", tmp_path / "llm"
    shutil.copytree(encoder_dirs["siglip2_naflex"], enc)
    shutil.copytree(llm_dir_untied, llm)
    model = VLM.from_config(model_config(str(enc), str(llm), "siglip2_naflex")).eval()
    assert not model.llm.config.tie_word_embeddings
    proc = model.processor()
    b = batch_of(proc, [sample(proc, n_images=2)])
    model.save_pretrained(tmp_path / "m")
    shutil.rmtree(enc)
    shutil.rmtree(llm)  # the saved folder must be self-contained
    loaded = VLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits_of(model, b), logits_of(loaded, b))
    emb, head = loaded.llm.get_input_embeddings().weight, loaded.llm.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)
    # saving over an existing folder replaces it
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(logits_of(VLM.from_pretrained(tmp_path / "m"), b), logits_of(model, b))


def test_from_pretrained_refuses_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vlmkit model folder"):
        VLM.from_pretrained(tmp_path)


# ---- generation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_vlm(encoder_dirs, tok_dir, tmp_path_factory):
    """GPT-2 has learned absolute positions: unlike RoPE (shift-invariant), wrong position ids under
    left padding change its outputs, so it is the model that makes the generate test sensitive."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               initializer_range=0.2, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return VLM.from_config(model_config(encoder_dirs["clip"], str(d))).eval()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_batched_left_padded_generate_equals_single(which, request):
    model = request.getfixturevalue("vlm" if which == "llama" else "gpt2_vlm")
    proc = model.processor()
    prompts = [sample(proc, "What color is the shape?", gen=True),
               sample(proc, "How many shapes are there? Describe the image.", n_images=2, gen=True),
               sample(proc, "hello", gen=True)]
    lengths = [len(p["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    b = batch_of(proc, prompts, side="left")
    assert (b["attention_mask"][:, 0] == 0).any()  # some rows really are left-padded
    batched = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], **kw)
    for r, p in enumerate(prompts):
        single = model.generate(p["input_ids"][None], None, p["pixel_values"], **kw)
        assert torch.equal(batched.sequences[r], single.sequences[0]), r
        for s_b, s_1 in zip(batched.scores, single.scores):
            torch.testing.assert_close(s_b[r], s_1[0], atol=1e-4, rtol=1e-4)
    if which == "gpt2":
        # control: the padded row with uncorrected positions 0..T-1 gives other logits, so the
        # comparison above really checks the position ids
        r = lengths.index(min(lengths))
        with torch.no_grad():
            e = model.embed(b["input_ids"], b["pixel_values"])[r:r + 1]
            wrong = model.llm(inputs_embeds=e, attention_mask=b["attention_mask"][r:r + 1],
                              position_ids=torch.arange(e.shape[1])[None]).logits[0, -1]
        assert not torch.allclose(wrong, batched.scores[0][r], atol=1e-3)


# ---- connector and registries ---------------------------------------------------------------------
def test_llava15_projector_structure():
    torch.manual_seed(0)
    proj = CONNECTORS.get("mlp2x_gelu")(24, 40)
    assert [n for n, _ in proj.named_parameters()] == ["linear_1.weight", "linear_1.bias",
                                                       "linear_2.weight", "linear_2.bias"]
    assert proj.linear_1.weight.shape == (40, 24) and proj.linear_1.bias.shape == (40,)
    assert proj.linear_2.weight.shape == (40, 40) and proj.linear_2.bias.shape == (40,)
    assert isinstance(proj.act, torch.nn.GELU) and proj.act.approximate == "none"
    x = torch.randn(2, 5, 24)
    ref = F.linear(F.gelu(F.linear(x, proj.linear_1.weight, proj.linear_1.bias)),
                   proj.linear_2.weight, proj.linear_2.bias)
    assert torch.equal(proj(x, (1, 5)), ref)
    assert proj.num_tokens((24, 24)) == 576  # LLaVA-1.5: CLIP-L/14 at 336px


def test_vlm_connector_matches_transformers_llava_names(vlm):
    keys = [k for k in vlm.state_dict() if k.startswith("connector.")]
    assert sorted(keys) == ["connector.linear_1.bias", "connector.linear_1.weight",
                            "connector.linear_2.bias", "connector.linear_2.weight"]


@pytest.mark.parametrize("registry,known", [(CONNECTORS, ["mlp2x_gelu"]),
                                            (ENCODERS, ["clip", "dinov2", "internvit", "siglip2"]),
                                            (TEMPLATES, ["plain", "tokenizer", "vicuna_v1"])])
def test_registry_unknown_name_lists_known(registry, known):
    with pytest.raises(KeyError) as ei:
        registry.get("no-such-part")
    msg = str(ei.value)
    assert "no-such-part" in msg
    for name in known:
        assert name in msg
        assert name in registry


def test_registry_refuses_duplicates():
    from vlmkit.registry import Registry

    r = Registry("thing")
    r.register("a")(1)
    r.register("a")(1)  # re-registering the same object is harmless (module re-import)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(2)
