"""Dynamics transformer: block causality, KV-cache equivalence, slot permutation equivariance, learning a
toy task, input errors; the symlog two-hot distribution."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from world_model import twohot
from world_model.dynamics import DynamicsConfig, Predictions, SlotDynamics, dynamics_loss, sample_step

CFG = DynamicsConfig(num_slots=3, num_vars=2, num_codes=5, frame_vars=2, frame_codes=4, num_actions=4,
                     embed_dim=32, layers=2, heads=2, mlp_ratio=2, max_steps=8, reward_bins=31)
T = 6


def make_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = SlotDynamics(cfg).eval()
    torch.nn.init.normal_(model.reward_head.weight, std=0.5)  # zero at init: make reward sensitive to inputs
    return model


def random_inputs(cfg=CFG, b=2, t=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(cfg.num_codes, (b, t, cfg.num_slots, cfg.num_vars), generator=g)
    frames = torch.randint(cfg.frame_codes, (b, t, cfg.frame_vars), generator=g) if cfg.frame_vars else None
    actions = torch.randint(cfg.num_actions, (b, t), generator=g)
    return slots, frames, actions


def fields(pred):
    return {"slots": pred.slot_logits, "frame": pred.frame_logits, "reward": pred.reward_logits,
            "cont": pred.cont_logits}


def changed(a, b, upto):
    """Per field: whether predictions at steps < upto differ."""
    return {k: not torch.allclose(a[k][:, :upto], b[k][:, :upto], atol=1e-6) for k in a}


def test_block_causality():
    model = make_model()
    slots, frames, actions = random_inputs()
    with torch.no_grad():
        base = fields(model(slots, frames, actions))
        for t in range(T - 1):
            for which in ("slots", "frames", "actions"):
                s, f, a = slots.clone(), frames.clone(), actions.clone()
                x = {"slots": s, "frames": f, "actions": a}[which]
                x[:, t + 1] = (x[:, t + 1] + 1) % 4  # a change at step t+1 ...
                out = fields(model(s, f, a))
                assert not any(changed(base, out, t + 1).values()), (which, t)  # ... leaves steps <= t alone
                assert any(changed(base, out, t + 2).values()), (which, t)  # ... and reaches step t+1
            a = actions.clone()
            a[:, t] = (a[:, t] + 1) % CFG.num_actions  # step t's own action is seen by all of step t's outputs
            out = fields(model(slots, frames, a))
            for k in out:
                assert not torch.allclose(base[k][:, t], out[k][:, t], atol=1e-6), (k, t)


@pytest.mark.parametrize("frame_vars", [2, 0])
def test_kv_cache_matches_full_forward(frame_vars):
    cfg = DynamicsConfig(**{**CFG.__dict__, "frame_vars": frame_vars})
    model = make_model(cfg)
    slots, frames, actions = random_inputs(cfg)
    with torch.no_grad():
        full = fields(model(slots, frames, actions))
        for chunks in ([1] * T, [2, 1, 3]):
            cache = model.init_cache(2, T, "cpu", torch.float32)
            outs, t0 = [], 0
            for n in chunks:
                sl = slice(t0, t0 + n)
                outs.append(fields(model(slots[:, sl], frames[:, sl] if frames is not None else None,
                                         actions[:, sl], cache)))
                t0 += n
            assert cache.steps == T
            for k, v in full.items():
                if v is None:
                    assert all(o[k] is None for o in outs)
                    continue
                torch.testing.assert_close(torch.cat([o[k] for o in outs], 1), v, atol=1e-5, rtol=1e-5)


def test_slot_permutation_equivariance_with_the_tags_moving_with_the_slots():
    model = make_model()
    slots, frames, actions = random_inputs()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = model(slots, frames, actions)
        model.slot_tags.copy_(model.slot_tags[perm])
        b = model(slots[:, :, perm], frames, actions)
    torch.testing.assert_close(b.slot_logits, a.slot_logits[:, :, perm], atol=1e-5, rtol=1e-5)
    for k in ("frame_logits", "reward_logits", "cont_logits"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k), atol=1e-5, rtol=1e-5)


def test_slots_whose_codes_tie_keep_their_own_histories():
    """Slots 0 and 1 differ at steps 0-2 and tie at step 3: their tags let each find its own history, so their
    predictions for step 4 differ. A checkpoint from before the tags loads them as zeros: the tie then gives equal
    predictions, as that model trained, and so does one built with `slot_tags=False`."""
    model = make_model()
    slots, frames, actions = random_inputs(t=4)
    slots[:, :3, 1] = (slots[:, :3, 0] + 1) % CFG.num_codes
    slots[:, 3, 1] = slots[:, 3, 0]
    with torch.no_grad():
        tagged = model(slots, frames, actions).slot_logits[:, -1]
        assert not torch.allclose(tagged[:, 0], tagged[:, 1], atol=1e-4)
        old = make_model()
        state = {k: v for k, v in model.state_dict().items() if k != "slot_tags"}
        old.load_state_dict(state)
        untagged = old(slots, frames, actions).slot_logits[:, -1]
    assert not old.slot_tags.any() and torch.equal(untagged[:, 0], untagged[:, 1])
    fresh = make_model(seed=5)  # the tags are fixed, the same in every build, and saved with the weights
    assert torch.equal(fresh.slot_tags, model.slot_tags) and "slot_tags" in model.state_dict()
    fresh.load_state_dict(old.state_dict())
    assert not fresh.slot_tags.any()
    ablated = make_model(dataclasses.replace(CFG, slot_tags=False))  # dynamics.slot_tags=false
    with torch.no_grad():
        logits = ablated(slots, frames, actions).slot_logits[:, -1]
    assert not ablated.slot_tags.any() and torch.equal(logits[:, 0], logits[:, 1])


def toy_batch(cfg, b, g):
    """Deterministic dynamics: codes(t+1) = codes(t) + action mod c; reward(t+1) = action odd;
    continue(t+1) = action != 3."""
    slots, frames, actions = random_inputs(cfg, b, T, seed=int(torch.randint(1 << 30, (1,), generator=g)))
    for t in range(1, T):
        slots[:, t] = (slots[:, t - 1] + actions[:, t - 1, None, None]) % cfg.num_codes
        frames[:, t] = (frames[:, t - 1] + actions[:, t - 1, None]) % cfg.frame_codes
    rewards = torch.zeros(b, T)
    rewards[:, 1:] = (actions[:, :-1] % 2).float()
    continues = torch.ones(b, T)
    continues[:, 1:] = (actions[:, :-1] != 3).float()
    return slots, frames, actions, rewards, continues


def test_dynamics_loss_learns_toy_task():
    torch.manual_seed(0)
    model = SlotDynamics(CFG).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        slots, frames, actions, rewards, continues = toy_batch(CFG, 8, g)
        loss, stats = dynamics_loss(model(slots, frames, actions), slots, frames, rewards, continues)
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        slots, frames, actions, rewards, continues = toy_batch(CFG, 64, g)
        loss, stats = dynamics_loss(model.eval()(slots, frames, actions), slots, frames, rewards, continues)
    # ~7.7 -> ~0.37, of which ~0.34 is the entropy of reward 1's two-hot target (the loss's floor)
    assert loss.item() < first / 8, (first, stats)
    assert stats["acc_slots"] > 95 and stats["acc_frame"] > 90, stats  # in %


def test_loss_mask_excludes_targets():
    model = make_model()
    slots, frames, actions = random_inputs()
    rewards, continues = torch.randn(2, T), torch.ones(2, T)
    pred = model(slots, frames, actions)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[:, -2:] = False
    ref, _ = dynamics_loss(pred, slots, frames, rewards, continues, mask)
    s, f, r, c = slots.clone(), frames.clone(), rewards.clone(), continues.clone()
    s[:, -2:], f[:, -2:], r[:, -2:], c[:, -2:] = 0, 0, 1e3, 0  # garbage in the masked steps
    masked, _ = dynamics_loss(pred, s, f, r, c, mask)
    unmasked, _ = dynamics_loss(pred, s, f, r, c)
    torch.testing.assert_close(masked, ref)
    assert not torch.allclose(unmasked, ref)


def test_sample_step():
    model = make_model()
    slots, frames, actions = random_inputs()
    with torch.no_grad():
        pred = model(slots, frames, actions)
    s, f, r, c = sample_step(pred, temperature=0)
    assert s.shape == (2, 3, 2) and f.shape == (2, 2) and r.shape == (2,) and c.shape == (2,)
    assert torch.equal(s, pred.slot_logits[:, -1].argmax(-1)) and torch.equal(f, pred.frame_logits[:, -1].argmax(-1))
    assert ((c > 0) & (c < 1)).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_step(pred, 1.0, g1)[0], sample_step(pred, 1.0, g2)[0])
    # sampling frequencies follow the softmax
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    big = type(pred)(logits.expand(20000, 1, 1, 1, 5), None, torch.zeros(20000, 1, 31), torch.zeros(20000, 1))
    freq = torch.bincount(sample_step(big, 1.0, g1)[0].flatten(), minlength=5) / 20000
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.02, rtol=0)


def test_cache_overflow_and_shape_errors():
    model = make_model()
    slots, frames, actions = random_inputs()
    cache = model.init_cache(2, 4, "cpu", torch.float32)
    model(slots[:, :3], frames[:, :3], actions[:, :3], cache)
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        model(slots[:, 3:5], frames[:, 3:5], actions[:, 3:5], cache)
    with pytest.raises(ValueError, match="max_steps"):
        model.init_cache(2, CFG.max_steps + 1, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"slot_codes must have shape \(batch=2, time=6, num_slots=3, num_vars=2\)"):
        model(slots[:, :, :2], frames, actions)
    with pytest.raises(ValueError, match=r"frame_codes must have shape \(batch=2, time=6, frame_vars=2\)"):
        model(slots, frames[:, :, :1], actions)
    with pytest.raises(ValueError, match="frame_codes must have shape"):
        model(slots, None, actions)
    with pytest.raises(ValueError, match=r"actions must have shape \(batch, time\)"):
        model(slots, frames, actions[:, :, None])
    with pytest.raises(ValueError, match="slot_codes must have shape"):
        model(slots, frames, actions[:, :4])
    long = random_inputs(t=CFG.max_steps + 1)
    with pytest.raises(ValueError, match="exceeds max_steps=8"):
        model(*long)
    with pytest.raises(ValueError, match="cache was made for batch"):
        model(slots[:1, :2], frames[:1, :2], actions[:1, :2], model.init_cache(2, 4, "cpu", torch.float32))


# --- two-hot -------------------------------------------------------------------------------------

def test_symlog_symexp_inverse():
    x = torch.tensor([-1e4, -3.5, -1.0, 0.0, 0.3, 1.0, 1e4])
    torch.testing.assert_close(twohot.symexp(twohot.symlog(x)), x)
    assert twohot.symlog(torch.tensor(math.e - 1)).item() == pytest.approx(1.0)


def test_twohot_encode_weights():
    x = torch.tensor([0.0, 1.0, -3.5, 1e4, 1e10, -1e10])
    target = twohot.encode(x)
    bins = twohot.bin_values()
    assert target.shape == (6, 255) and (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(6))
    assert ((target > 0).sum(-1) <= 2).all()
    # the expectation reproduces symlog(x), clipped to [-20, 20]
    torch.testing.assert_close((target * bins).sum(-1), twohot.symlog(x).clamp(-20, 20), atol=1e-5, rtol=1e-6)
    assert target[0, 127] == 1.0 and bins[127] == 0.0  # exact at a bin
    assert target[4, -1] == 1.0 and target[5, 0] == 1.0  # clipped outside
    hit = twohot.encode(twohot.symexp(bins[[3, 200]]))  # values at bins put all weight on that bin
    assert hit[0, 3] > 0.999 and hit[1, 200] > 0.999


def test_twohot_mean_round_trip():
    x = torch.tensor([0.0, 1.0, -3.5, 1e4, 1e10])
    logits = torch.log(twohot.encode(x).clamp_min(1e-12))
    expected = torch.tensor([0.0, 1.0, -3.5, 1e4, twohot.symexp(torch.tensor(20.0)).item()])  # 1e10 is clipped
    torch.testing.assert_close(twohot.mean(logits), expected, rtol=1e-4, atol=1e-5)


def test_twohot_loss_minimized_by_target():
    x = torch.tensor([1.0, -3.5, 250.0])
    target = twohot.encode(x)
    best = torch.log(target.clamp_min(1e-12)).requires_grad_()
    loss = twohot.loss(best, x)
    entropy = -(target * torch.log(target.clamp_min(1e-12))).sum(-1)
    torch.testing.assert_close(loss.detach(), entropy, atol=1e-5, rtol=1e-5)  # CE at its minimum = H(target)
    loss.sum().backward()
    assert best.grad.abs().max() < 1e-5  # a stationary point
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = best.detach() + torch.randn(best.shape, generator=g)
        assert (twohot.loss(other, x) > loss.detach()).all()
    # the value is a target: the loss's gradient reaches the logits only, never a value that carries a graph
    value = torch.tensor([0.5, 2.0], requires_grad=True)
    logits = torch.zeros(2, twohot.DEFAULT_BINS, requires_grad=True)
    twohot.loss(logits, value * 3).sum().backward()
    assert value.grad is None and logits.grad is not None
    torch.testing.assert_close(loss.detach(), F.cross_entropy(best.detach(), target, reduction="none"))


def test_the_loss_scores_step_t_outputs_against_step_t_plus_1():
    """Each step's outputs predict the next step: with T=2 only step 0's code, reward and continue logits count,
    against step 1's codes, reward and continuation. Step 0 is right about step 1 (code 2, reward 5, the episode
    ends), and step 1's outputs are wrong for every target: the losses are the targets' own entropy."""
    slot_logits = torch.full((1, 2, 1, 1, 3), -30.0)
    slot_logits[0, 0, 0, 0, 2] = slot_logits[0, 1, 0, 0, 0] = 30.0
    reward_logits = torch.log(twohot.encode(torch.tensor([[5.0, -5.0]]), 31).clamp_min(1e-30))
    cont_logits = torch.tensor([[-30.0, 30.0]])
    pred = Predictions(slot_logits, None, reward_logits, cont_logits)
    _, stats = dynamics_loss(pred, torch.tensor([0, 2]).view(1, 2, 1, 1), None, torch.tensor([[0.0, 5.0]]),
                             torch.tensor([[1.0, 0.0]]))
    target = twohot.encode(torch.tensor(5.0), 31)
    entropy = -(target * target.clamp_min(1e-30).log()).sum()
    assert float(stats["acc_slots"]) == 100.0 and float(stats["loss_slots"]) < 1e-6
    assert float(stats["loss_reward"]) == pytest.approx(float(entropy), abs=1e-4)
    assert float(stats["loss_cont"]) < 1e-6


def test_frame_code_and_status_token_accuracies_are_apart():
    """Frame codes of 4 positions, the last 1 an env's status token: step 0 predicts step 1's learned codes
    (2, 0, 1) right but for the second, and its status token (3) wrong: acc_frame 2/3 (in %), acc_status 0; counted
    as one vocabulary without status_vars, 2/4."""
    target = torch.tensor([[[0, 0, 0, 0], [2, 0, 1, 3]]])  # b t g
    guess = torch.tensor([[2, 1, 1, 0], [0, 0, 0, 0]])  # t g: step 1's outputs count for nothing (T=2)
    frame_logits = torch.nn.functional.one_hot(guess, 4)[None].float() * 30.0
    slot_logits = torch.zeros(1, 2, 1, 1, 3)
    pred = Predictions(slot_logits, frame_logits, torch.zeros(1, 2, 31), torch.zeros(1, 2))
    args = (torch.zeros(1, 2, 1, 1, dtype=torch.long), target, torch.zeros(1, 2), torch.ones(1, 2))
    _, stats = dynamics_loss(pred, *args, status_vars=1)
    assert float(stats["acc_frame"]) == pytest.approx(200 / 3) and float(stats["acc_status"]) == 0.0
    _, stats = dynamics_loss(pred, *args)
    assert float(stats["acc_frame"]) == 50.0 and "acc_status" not in stats


def test_the_sampling_temperature_divides_the_logits():
    """20000 draws at temperature 2 follow softmax(logits / 2)."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    n = 20000
    pred = Predictions(logits.expand(n, 1, 1, 1, 5), None, torch.zeros(n, 1, 31), torch.zeros(n, 1))
    codes = sample_step(pred, 2.0, torch.Generator().manual_seed(0))[0]
    freq = torch.bincount(codes.flatten(), minlength=5) / n
    torch.testing.assert_close(freq, (logits / 2).softmax(-1), atol=0.02, rtol=0)


def test_dropout_is_off_in_eval_mode():
    cfg = DynamicsConfig(num_slots=2, num_vars=1, num_codes=3, frame_vars=0, num_actions=2, embed_dim=16,
                         layers=1, heads=2, max_steps=4, dropout=0.5, reward_bins=11)
    torch.manual_seed(0)
    m = SlotDynamics(cfg).eval()
    s, a = torch.randint(3, (1, 3, 2, 1)), torch.randint(2, (1, 3))
    with torch.no_grad():
        torch.testing.assert_close(m(s, None, a).slot_logits, m(s, None, a).slot_logits)


def test_masked_mean_divides_by_the_valid_count():
    from world_model.dynamics import masked_mean

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert masked_mean(x, torch.tensor([[True, False], [False, True]])).item() == pytest.approx(2.5)


def test_the_dynamics_loss_is_the_sum_of_its_terms_and_the_code_loss_a_mean():
    """loss_slots is the mean cross-entropy of step t's logits against step t+1's codes; the loss sums every term."""
    torch.manual_seed(0)
    slot_logits, frame_logits = torch.randn(2, 3, 2, 2, 4), torch.randn(2, 3, 2, 5)
    pred = Predictions(slot_logits, frame_logits, torch.randn(2, 3, 11), torch.randn(2, 3))
    codes, frames = torch.randint(4, (2, 3, 2, 2)), torch.randint(5, (2, 3, 2))
    loss, stats = dynamics_loss(pred, codes, frames, torch.randn(2, 3), torch.ones(2, 3))
    assert {"loss_slots", "loss_frame", "loss_reward", "loss_cont"} <= set(stats)
    ce = F.cross_entropy(slot_logits[:, :-1].flatten(0, -2), codes[:, 1:].flatten())
    torch.testing.assert_close(stats["loss_slots"], ce)
    torch.testing.assert_close(loss, sum(v for k, v in stats.items() if k.startswith("loss_")))


def test_frame_variables_with_fewer_codes_than_the_vocabulary_get_none_of_the_rest():
    """Learned frame codes (here 2 of 4) and status tokens (4) share one vocabulary: a learned variable's logits past
    its count are -inf, so its loss stays finite and neither training's argmax nor imagination's samples reach them."""
    model = make_model()
    model.limit_frame_codes([2, 4])
    slots, frames, actions = random_inputs()
    frames[..., 0] %= 2
    pred = model(slots, frames, actions)
    assert torch.isinf(pred.frame_logits[..., 0, 2:]).all() and torch.isfinite(pred.frame_logits[..., 0, :2]).all()
    assert torch.isfinite(pred.frame_logits[..., 1, :]).all()
    loss, _ = dynamics_loss(pred, slots, frames, torch.zeros(2, T), torch.ones(2, T))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample_step(pred, 1.0, g)[1] for _ in range(200)])  # n b g
    assert drawn[..., 0].max() < 2 and drawn[..., 1].max() == 3
    model.limit_frame_codes([4, 4])
    assert model.frame_code_mask is None
    with pytest.raises(ValueError, match=r"2 code counts in \(0, 4\] for the 2 frame variables, got \[5, 4\]"):
        model.limit_frame_codes([5, 4])


@pytest.mark.parametrize("frame_vars", [2, 0])
def test_imagination_through_the_cache_equals_recomputing_the_whole_rollout(frame_vars):
    """ImaginedEnv (context fed once, then one cached step per action) imagines what re-running the dynamics on the
    whole growing sequence at each step would: the same argmax codes, rewards and continuations."""
    from world_model.imagined_env import ImaginedEnv

    cfg = DynamicsConfig(**{**CFG.__dict__, "frame_vars": frame_vars, "max_steps": 10})
    model = make_model(cfg)
    slots, frames, actions = random_inputs(cfg, b=3, t=9, seed=4)
    context, horizon = 4, 5
    env = ImaginedEnv(model, temperature=0.0)
    with torch.no_grad():
        env.reset(slots[:, :context], frames[:, :context] if frame_vars else None, actions[:, :context], horizon)
        seq_slots, seq_frames = slots[:, :context], frames[:, :context] if frame_vars else None
        for t in range(context - 1, context - 1 + horizon):
            cached = env.step(actions[:, t])
            full = sample_step(model(seq_slots, seq_frames, actions[:, :seq_slots.shape[1]]), 0.0)
            assert torch.equal(cached[0], full[0]) and (not frame_vars or torch.equal(cached[1], full[1]))
            torch.testing.assert_close(cached[2], full[2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cached[3], full[3], atol=1e-5, rtol=1e-5)
            seq_slots = torch.cat([seq_slots, cached[0][:, None]], 1)
            seq_frames = torch.cat([seq_frames, cached[1][:, None]], 1) if frame_vars else None
