"""RLHF with the Llama 2 recipe: rejection sampling and PPO over Ray role actors.

- `objectives`: the combined reward gate, logit/whiten, per-token KL, GAE, PPO losses (pure math).
- `actors`: one Ray actor class per role (policy, critic, reference, reward) and the `RoleGroup`
  that owns their placement group.
- `rollout`: prompts, sampling and scoring through the roles, held-out evaluation, bootstrap.
- `rejection`, `ppo`: the two training loops; `config`: their step configs.
"""
