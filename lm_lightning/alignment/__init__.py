"""Preference tuning of a pre-trained decoder: preference data (preference.py), the losses as plain
functions (losses.py), a Bradley–Terry reward model (reward.py), policies trained against a frozen
reference (policy.py) with DPO (dpo.py) or KTO (kto.py), and RLHF with PPO (ppo.py).
``lm-lightning align method=...`` runs each of them (lm_lightning/align.py)."""
