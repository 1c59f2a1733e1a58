# Preference tuning (DPO) of a model that answers: python train.py configs/dpo.py --init_from=MODEL
# (ours, or a Hugging Face folder with a chat template; add --lora_rank=8 for adapters, whose base
# switched off is then the reference). --data=FILE.jsonl of TRL's {"prompt", "chosen", "rejected"}.
# The shipped demo (README, "Preference tuning and RL"): python data/numerals/make.py, a model trained
# on styles.jsonl (both styles at random), then this config moves its held-out replies to the
# chosen style: heldout_acc is the share of held-out prompts answered exactly as chosen.
out_dir = "out/dpo"
data = "data/numerals/prefs.jsonl"
val_fraction = 0.1  # with the seed, the numbers the numerals config held out: never trained on
beta = 0.5  # TRL's default is 0.1: here 0.5 keeps the answers right once the style has moved (0.1 drifts)
loss_type = "sigmoid"
batch_size = 32  # pairs: each step reads 64 answers
learning_rate = 1e-4
max_iters = 100
lr_decay_iters = 100
warmup_iters = 10
min_lr = 1e-5
eval_interval = 20
eval_iters = 5
log_interval = 10
weight_decay = 0.0
dropout = 0.0
