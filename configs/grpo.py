# Reinforcement learning from rewards (GRPO) of a model that answers:
# python train.py configs/grpo.py --init_from=MODEL [--data=prompts.jsonl --reward=exact_match]
# The shipped demo (README, "Preference tuning and RL"): a sorter of 8 letters trained briefly, so it
# stops short, then this config with the sorter's own checker as the only signal (no answers are
# read): its held-out exact match rises.
out_dir = "out/grpo"
reward = "sort"  # the sorter's checker; a .jsonl of prompts: exact_match, or your own file.py:function
num_generations = 8  # samples of each prompt
batch_size = 16  # prompts a step: 128 samples
max_completion_length = 64
temperature = 1.0
epsilon = 0.2
beta = 0.0  # no KL term (TRL's default): no reference model is needed
num_iterations = 1
learning_rate = 5e-4  # 1e-3 got there too, with a fall to 46% on the way
max_iters = 200
lr_decay_iters = 200
warmup_iters = 10
min_lr = 5e-5
weight_decay = 0.0
eval_interval = 25
log_interval = 5
dropout = 0.0
