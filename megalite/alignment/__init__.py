"""Post-training math: preference losses (dpo), Bradley-Terry reward-model loss (reward) and the PPO/GRPO
advantage and policy-loss math (rl). Pure torch functions on per-example or per-token tensors; the stages
that feed them batches live elsewhere. Formulas and citations: docs/alignment_losses.md."""
