"""Actor-critic in imagination: λ-returns, return normalizer, slot permutation invariance, imagined rollouts
through the KV cache, learning a rewarding action and a constant-reward value, skipping non-finite updates."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from agent.actor_critic import ActorCritic, ActorCriticConfig, ReturnNormalizer, discount_weights, lambda_returns
from agent.imagination import Trajectory, imagine
from world_model import twohot
from world_model.dynamics import DynamicsConfig, SlotDynamics

DYN = DynamicsConfig(num_slots=3, num_vars=2, num_codes=5, frame_vars=2, frame_codes=4, num_actions=4,
                     embed_dim=16, layers=1, heads=2, mlp_ratio=2, max_steps=8, reward_bins=31)
AC = ActorCriticConfig(embed_dim=16, layers=1, heads=2, mlp_ratio=2, reward_bins=31)


def states(dyn, b, t, gen):
    slots = torch.randint(dyn.num_codes, (b, t, dyn.num_slots, dyn.num_vars), generator=gen)
    frames = torch.randint(dyn.frame_codes, (b, t, dyn.frame_vars), generator=gen) if dyn.frame_vars else None
    return slots, frames


def make_dynamics(dyn=DYN, seed=0):
    torch.manual_seed(seed)
    model = SlotDynamics(dyn).eval()
    torch.nn.init.normal_(model.reward_head.weight, std=0.5)  # zero at init: make rewards vary
    return model


def test_lambda_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 1.0, 1.5, 2.0]])
    c = torch.tensor([[1.0, 0.5, 1.0]])
    # R3 = v3 = 2; R2 = 3 + .9*1*(.2*2 + .8*2) = 4.8; R1 = 2 + .9*.5*(.2*1.5 + .8*4.8) = 3.863;
    # R0 = 1 + .9*1*(.2*1 + .8*3.863) = 3.96136
    expected = torch.tensor([[3.96136, 3.863, 4.8]])
    torch.testing.assert_close(lambda_returns(r, v, c, 0.9, 0.8), expected)
    torch.testing.assert_close(lambda_returns(r, v, c, 0.9, 0.0), r + 0.9 * c * v[:, 1:])  # one-step TD
    ones = torch.ones_like(c)
    # discounted reward sum + discounted bootstrap v3 = 2
    mc = torch.tensor([[1 + .9 * 2 + .81 * 3 + .729 * 2, 2 + .9 * 3 + .81 * 2, 3 + .9 * 2]])
    torch.testing.assert_close(lambda_returns(r, v, ones, 0.9, 1.0), mc)
    torch.testing.assert_close(discount_weights(c, 0.9), torch.tensor([[1.0, 0.9, 0.405]]))
    # a terminal start (1 - is_terminal = 0) weighs nothing; a live one as before
    starts = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(discount_weights(c.repeat(2, 1), 0.9, starts),
                               torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.9, 0.405]]))


def test_return_normalizer():
    norm = ReturnNormalizer(decay=0.5)
    x = torch.arange(101.0)  # percentiles 5 and 95
    norm.update(x)
    assert (float(norm.low), float(norm.high), float(norm.scale())) == pytest.approx((5.0, 95.0, 90.0))
    norm.update(x + 10)  # EMA: halfway to 15 / 105
    assert (float(norm.low), float(norm.high)) == pytest.approx((10.0, 100.0))
    norm.update(torch.tensor([1.0, float("nan")]))  # ignored
    assert int(norm.count) == 2 and float(norm.low) == pytest.approx(10.0)
    small = ReturnNormalizer()
    small.update(torch.linspace(0, 0.5, 50))
    assert float(small.scale()) == 1.0  # floor: small returns are not blown up
    restored = ReturnNormalizer()
    restored.load_state_dict(norm.state_dict())
    assert float(restored.high) == pytest.approx(100.0) and int(restored.count) == 2


@pytest.mark.parametrize("frame_vars", [2, 0])
def test_slot_permutation_invariance(frame_vars):
    dyn = DynamicsConfig(**{**DYN.__dict__, "frame_vars": frame_vars})
    torch.manual_seed(0)
    ac = ActorCritic(dyn, AC)
    torch.nn.init.normal_(ac.critic.head.weight, std=0.5)  # zero at init
    slots, frames = states(dyn, 5, 1, torch.Generator().manual_seed(1))
    slots, frames = slots[:, 0], frames[:, 0] if frames is not None else None
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        for f in (ac.actor, ac.critic.value):
            torch.testing.assert_close(f(slots[:, perm], frames), f(slots, frames), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ac.actor(slots, frames), ac.actor(slots.roll(1, 0), frames))  # not constant


@pytest.mark.parametrize("context", [1, 3])
def test_imagine_shapes_and_cache_consistency(context):
    dyn_model = make_dynamics()
    ac = ActorCritic(DYN, AC)
    b, h = 4, DYN.max_steps - context + 1  # fills the cache exactly: c-1 context steps + h imagined ones
    slots, frames = states(DYN, b, context, torch.Generator().manual_seed(2))
    acts = torch.randint(DYN.num_actions, (b, context))
    ctx = SimpleNamespace(slot_codes=slots, frame_codes=frames)
    traj = imagine(dyn_model, ac.actor, ctx, acts, h, temperature=0.0)
    assert traj.slot_codes.shape == (b, h + 1, 3, 2) and traj.frame_codes.shape == (b, h + 1, 2)
    assert traj.actions.shape == traj.rewards.shape == traj.continues.shape == (b, h)
    assert traj.actions.min() >= 0 and traj.actions.max() < DYN.num_actions
    assert ((traj.continues >= 0) & (traj.continues <= 1)).all()
    assert torch.equal(traj.slot_codes[:, 0], slots[:, -1])
    # Re-run context + imagined steps in one uncached forward: same rewards, continues and (argmax) codes.
    full_slots = torch.cat([slots[:, :-1], traj.slot_codes[:, :-1]], 1)
    full_frames = torch.cat([frames[:, :-1], traj.frame_codes[:, :-1]], 1)
    full_actions = torch.cat([acts[:, :-1], traj.actions], 1)
    with torch.no_grad():
        pred = dyn_model(full_slots, full_frames, full_actions)
    tail = slice(context - 1, None)
    torch.testing.assert_close(twohot.mean(pred.reward_logits[:, tail]), traj.rewards, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.sigmoid(pred.cont_logits[:, tail]), traj.continues, atol=1e-5, rtol=1e-5)
    assert torch.equal(pred.slot_logits[:, tail].argmax(-1), traj.slot_codes[:, 1:])
    with pytest.raises(ValueError, match="max_steps"):  # one step more than the dynamics' time embedding
        imagine(dyn_model, ac.actor, ctx, acts, h + 1)
    if context > 1:  # wrong context shapes name the argument at fault
        with pytest.raises(ValueError, match=r"actions must be the context's actions `b c` = \(4, 3\)"):
            imagine(dyn_model, ac.actor, ctx, acts[:, :2], h)
        with pytest.raises(ValueError, match=r"slot_codes must be the context's codes `b c k v`"):
            imagine(dyn_model, ac.actor, SimpleNamespace(slot_codes=slots[:, 0], frame_codes=frames), acts, h)


def test_imagine_determinism_no_frames():
    dyn = DynamicsConfig(**{**DYN.__dict__, "frame_vars": 0})
    dyn_model = make_dynamics(dyn)
    ac = ActorCritic(dyn, AC)
    slots, _ = states(dyn, 3, 2, torch.Generator().manual_seed(3))
    ctx = SimpleNamespace(slot_codes=slots, frame_codes=None)
    acts = torch.zeros(3, 2, dtype=torch.long)
    runs = [imagine(dyn_model, ac.actor, ctx, acts, 5, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert runs[0].frame_codes is None
    assert torch.equal(runs[0].slot_codes, runs[1].slot_codes) and torch.equal(runs[0].actions, runs[1].actions)
    assert not (torch.equal(runs[0].slot_codes, runs[2].slot_codes) and torch.equal(runs[0].actions, runs[2].actions))
    seeded = []
    for _ in range(2):
        torch.manual_seed(11)
        seeded.append(imagine(dyn_model, ac.actor, ctx, acts, 5))
    assert torch.equal(seeded[0].slot_codes, seeded[1].slot_codes) and torch.equal(seeded[0].rewards, seeded[1].rewards)


def bandit_trajectory(ac, gen, b=32, h=4, reward=None):
    """Random states, actions from the current policy; reward 1 for action 1 (or a constant), never ending."""
    slots, frames = states(DYN, b, h + 1, gen)
    actions = ac.act(slots[:, :-1].flatten(0, 1), frames[:, :-1].flatten(0, 1), generator=gen).view(b, h)
    rewards = (actions == 1).float() if reward is None else torch.full((b, h), reward)
    return Trajectory(slots, frames, actions, rewards, torch.ones(b, h))


def test_update_learns_rewarding_action():
    torch.manual_seed(0)
    ac = ActorCritic(DYN, ActorCriticConfig(**{**AC.__dict__, "gamma": 0.5, "actor_lr": 3e-3, "critic_lr": 3e-3}))
    gen = torch.Generator().manual_seed(0)
    probe, probe_frames = states(DYN, 64, 1, gen)

    def p_reward():
        with torch.no_grad():
            return float(ac.actor.dist(probe[:, 0], probe_frames[:, 0]).probs[:, 1].mean())

    before = p_reward()
    for _ in range(60):
        stats = ac.update(bandit_trajectory(ac, gen))
        assert stats["skipped"] == 0.0
    assert before < 0.4 and p_reward() > 0.9
    assert float(ac.act(probe[:, 0], probe_frames[:, 0], sample=False).eq(1).float().mean()) == 1.0


def test_rollouts_from_terminal_frames_teach_nothing():
    """Imagination starts on every replayed frame; one where the real episode had ended (is_terminal) gets weight
    0, so its rows add nothing to either loss or gradient."""
    torch.manual_seed(0)
    ac = ActorCritic(DYN, AC)
    traj = bandit_trajectory(ac, torch.Generator().manual_seed(3), b=6)

    def losses_and_grads(t):
        ac.normalizer.count.zero_()  # the normalizer starts afresh for each call (its first batch sets it)
        ac.zero_grad(set_to_none=True)
        actor_loss, critic_loss, _ = ac(t)
        (actor_loss + critic_loss).backward()
        return actor_loss.detach(), critic_loss.detach(), [p.grad.clone() for p in ac.parameters() if p.grad is not None]

    traj.start_continues = torch.zeros(6)
    actor_loss, critic_loss, grads = losses_and_grads(traj)
    assert float(actor_loss) == 0.0 and float(critic_loss) == 0.0 and all(not g.any() for g in grads)
    traj.start_continues = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    mixed = losses_and_grads(traj)
    traj.start_continues = None
    live = losses_and_grads(traj)
    assert float(mixed[0]) != pytest.approx(float(live[0]))  # the two terminal rows' shares are gone


def test_critic_learns_constant_reward_value():
    torch.manual_seed(0)
    cfg = ActorCriticConfig(**{**AC.__dict__, "gamma": 0.5, "critic_lr": 3e-3, "ema_decay": 0.9})
    ac = ActorCritic(DYN, cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        ac.update(bandit_trajectory(ac, gen, reward=1.0))
    slots, frames = states(DYN, 64, 1, gen)
    with torch.no_grad():
        value = ac.critic.value(slots[:, 0], frames[:, 0])
    assert value.mean().item() == pytest.approx(1 / (1 - 0.5), abs=0.1)  # r / (1 - gamma * c)


def test_nonfinite_loss_skips_update_and_checkpoint_roundtrip():
    torch.manual_seed(0)
    ac = ActorCritic(DYN, AC)
    gen = torch.Generator().manual_seed(2)
    ac.update(bandit_trajectory(ac, gen))
    before = {k: v.clone() for k, v in ac.state_dict().items()}
    traj = bandit_trajectory(ac, gen)
    traj.rewards[0, 1] = float("nan")
    stats = ac.update(traj)
    assert stats["skipped"] == stats["skipped_actor"] == stats["skipped_critic"] == 1.0
    after = ac.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, slow critic and normalizer untouched
    other = ActorCritic(DYN, AC)
    other.load_state_dict(after)
    other.load_optimizer_state(copy.deepcopy(ac.optimizer_state()))  # as through a checkpoint file
    traj = bandit_trajectory(ac, torch.Generator().manual_seed(3))
    a, b = ac.update(traj), other.update(traj)
    assert float(a["loss_critic"]) == float(b["loss_critic"])
    assert all(torch.equal(x, y) for x, y in zip(ac.parameters(), other.parameters()))  # same step after restore


def test_return_normalizer_keeps_decay_of_the_old_percentiles():
    """Each update moves the 5th/95th percentiles by (1 - decay) toward the batch's: 0.9 * 5 + 0.1 * 15 = 6 and
    0.9 * 95 + 0.1 * 105 = 96 (a decay of 0.5 could not tell the two weights apart)."""
    norm = ReturnNormalizer(decay=0.9)
    norm.update(torch.arange(101.0))
    norm.update(torch.arange(101.0) + 10)
    assert (float(norm.low), float(norm.high)) == pytest.approx((6.0, 96.0))


def test_the_policy_mixes_in_unimix_of_uniform():
    """A near-certain actor (logit 100 against 0s) with unimix 0.01 over 4 actions: 0.99 + 0.0025 and 0.0025."""
    from agent.actor_critic import Actor

    dyn = DynamicsConfig(num_slots=3, num_vars=2, num_codes=5, frame_vars=0, num_actions=4, embed_dim=16)
    actor = Actor(dyn, ActorCriticConfig(embed_dim=16, layers=1, heads=2, mlp_ratio=2, unimix=0.01))
    with torch.no_grad():
        actor.head.weight.zero_()
        actor.head.bias.copy_(torch.tensor([100.0, 0, 0, 0]))
    probs = actor.dist(torch.zeros(1, 3, 2, dtype=torch.long), None).probs
    torch.testing.assert_close(probs, torch.tensor([[0.9925, 0.0025, 0.0025, 0.0025]]))


def _value_table_agent(values: list[float]) -> ActorCritic:
    """An actor-critic whose critic and slow critic read a state's value off its one slot code (code i: values[i],
    as two-hot logits), with a uniform actor; gamma 0.5, lambda 1, entropy 0.1."""
    dyn = DynamicsConfig(num_slots=1, num_vars=1, num_codes=len(values), frame_vars=0, num_actions=4, embed_dim=16)
    cfg = ActorCriticConfig(embed_dim=16, layers=1, heads=2, mlp_ratio=2, reward_bins=255, gamma=0.5, lam=1.0,
                            entropy=0.1)
    torch.manual_seed(0)
    ac = ActorCritic(dyn, cfg)
    table = torch.log(twohot.encode(torch.tensor(values)).clamp_min(1e-30))  # code -> value logits
    for critic in (ac.critic, ac.slow_critic):
        critic.net.forward = lambda slot_codes, frame_codes: torch.nn.functional.one_hot(
            slot_codes[:, 0, 0], len(values)).float()
        critic.head = torch.nn.Linear(len(values), 255)
        with torch.no_grad():
            critic.head.weight.copy_(table.T)
            critic.head.bias.zero_()
    with torch.no_grad():
        ac.actor.head.weight.zero_()
    return ac


def _three_states() -> Trajectory:
    """States s0, s1, s2 (codes 0, 1, 2), rewards 1 and continuations 1 on the two steps between them."""
    return Trajectory(torch.tensor([0, 1, 2]).view(1, 3, 1, 1), None, torch.zeros(1, 2, dtype=torch.long),
                      torch.ones(1, 2), torch.ones(1, 2))


def test_actor_loss_by_hand():
    """Values 0, 1, 3 of s0, s1, s2: returns R1 = 1 + 0.5 * 3 = 2.5, R0 = 1 + 0.5 * 2.5 = 2.25; advantages R - v(s_t)
    = 2.25 and 1.5 (return scale 1); weights 1 and 0.5. The uniform policy's log-prob and entropy are -ln 4 and
    ln 4, so the loss is the weighted mean of -(adv * log p + 0.1 * entropy)."""
    actor_loss, _, stats = _value_table_agent([0.0, 1.0, 3.0])(_three_states())
    torch.testing.assert_close(stats["return"], torch.tensor(2.375), atol=1e-3, rtol=0)
    torch.testing.assert_close(stats["advantage"], torch.tensor(1.875), atol=1e-3, rtol=0)
    ln4 = math.log(4)
    assert actor_loss.item() == pytest.approx((1.0 * (2.25 * ln4 - 0.1 * ln4) + 0.5 * (1.5 * ln4 - 0.1 * ln4)) / 2,
                                              abs=1e-3)


def test_critic_loss_by_hand():
    """The critic's two-hot loss on s0 and s1 (s2 only bootstraps) toward their returns 2.25 and 2.5, plus half
    (slow_reg 0.5) the pull toward the slow critic's values (5 and 6, apart from the critic's 0 and 1), weighted
    1 and 0.5."""
    ac = _value_table_agent([0.0, 1.0, 3.0])
    with torch.no_grad():
        ac.slow_critic.head.weight.copy_(torch.log(twohot.encode(torch.tensor([5.0, 6.0, 7.0])).clamp_min(1e-30)).T)
    ac.cfg.slow_reg = 0.5
    _, critic_loss, _ = ac(_three_states())
    logits = torch.log(twohot.encode(torch.tensor([0.0, 1.0])).clamp_min(1e-30))
    to_returns = twohot.loss(logits, torch.tensor([2.25, 2.5]))
    to_slow = twohot.loss(logits, torch.tensor([5.0, 6.0]))
    torch.testing.assert_close(critic_loss, ((to_returns + 0.5 * to_slow) * torch.tensor([1.0, 0.5])).mean(),
                               atol=1e-4, rtol=1e-4)


def test_advantages_are_divided_by_the_return_range():
    """Values 0, 10, 30: returns R1 = 1 + 0.5 * 30 = 16 and R0 = 1 + 0.5 * 16 = 9; their 5th to 95th percentile
    range (over 1) scales the advantages R - v."""
    ac = _value_table_agent([0.0, 10.0, 30.0])
    _, _, stats = ac(_three_states())
    returns = torch.tensor([9.0, 16.0])
    low, high = torch.quantile(returns, torch.tensor([0.05, 0.95]))
    assert float(ac.normalizer.low) == pytest.approx(float(low), abs=1e-2)
    adv = (returns - torch.tensor([0.0, 10.0])) / (high - low)
    assert float(stats["advantage"]) == pytest.approx(float(adv.mean()), abs=2e-2)


def test_an_imagined_termination_cuts_the_return_and_the_later_weights():
    """s1 imagined terminal (continuation 0 on the first step): R0 = r0 = 1 without bootstrapping; R1 = 2.5 is still
    computed but step 1 weighs 0 in the actor loss. Scale: 0.9 x (2.5 - 1), the returns' percentile range."""
    ac = _value_table_agent([0.0, 1.0, 3.0])
    traj = _three_states()
    traj = Trajectory(traj.slot_codes, None, traj.actions, traj.rewards, torch.tensor([[0.0, 1.0]]))
    actor_loss, _, stats = ac(traj)
    assert float(stats["return"]) == pytest.approx((1.0 + 2.5) / 2, abs=1e-3)
    ln4 = math.log(4)
    assert actor_loss.item() == pytest.approx((1.0 / (0.9 * 1.5) * ln4 - 0.1 * ln4) / 2, abs=1e-3)


def test_the_entropy_bonus_moves_a_peaked_policy():
    """Zero rewards and values, so zero advantages: only the entropy term can give the actor a gradient."""
    ac = _value_table_agent([0.0, 0.0, 0.0])
    with torch.no_grad():
        ac.actor.head.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    traj = _three_states()
    actor_loss, _, _ = ac(Trajectory(traj.slot_codes, None, traj.actions, torch.zeros(1, 2), traj.continues))
    actor_loss.backward()
    assert ac.actor.head.bias.grad.abs().sum() > 1e-4


def test_imagine_asks_the_actor_about_the_state_it_acts_in():
    """Step t's action is sampled from step t's imagined state, not the one before or after."""
    seen = []

    class Actor:
        def sample(self, slot_codes, frame_codes, generator=None):
            seen.append(slot_codes.clone())
            return torch.zeros(slot_codes.shape[0], dtype=torch.long)

    slots, frames = states(DYN, 2, 1, torch.Generator().manual_seed(0))
    traj = imagine(make_dynamics(), Actor(), SimpleNamespace(slot_codes=slots, frame_codes=frames), None, 4,
                   temperature=0.0)
    assert len(seen) == 4
    for t in range(4):
        assert torch.equal(seen[t], traj.slot_codes[:, t])


def test_the_slow_critic_follows_the_critic_by_ema_decay():
    """After an update, every slow-critic parameter is decay * its old value + (1 - decay) * the updated critic's."""
    dyn = DynamicsConfig(num_slots=2, num_vars=1, num_codes=3, frame_vars=0, num_actions=2, embed_dim=16)
    torch.manual_seed(0)
    ac = ActorCritic(dyn, ActorCriticConfig(embed_dim=16, layers=1, heads=2, mlp_ratio=2, reward_bins=31,
                                            ema_decay=0.9, critic_lr=1e-2))
    before = [p.clone() for p in ac.slow_critic.parameters()]
    ac.update(Trajectory(torch.randint(3, (4, 3, 2, 1)), None, torch.zeros(4, 2, dtype=torch.long),
                         torch.ones(4, 2), torch.ones(4, 2)))
    for old, slow, critic in zip(before, ac.slow_critic.parameters(), ac.critic.parameters()):
        torch.testing.assert_close(slow, 0.9 * old + 0.1 * critic)
    assert any(not torch.equal(old, slow) for old, slow in zip(before, ac.slow_critic.parameters()))
