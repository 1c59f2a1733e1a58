# The "nano-gpt" of the 3D LLM visualisation: sort six letters from {A, B, C}.
# 85,584 parameters; reaches 100% exact match on the held-out inputs in seconds on a CPU.
out_dir = "out/sort"
task = "sort"
sort_length = 6  # block_size follows: 2 * 6 - 1 = 11
sort_alphabet = "ABC"
sort_holdout = 0.2

n_layer = 3
n_head = 3
n_embd = 48
dropout = 0.0
activation = "gelu_tanh"  # minGPT's GELU, which the visualisation computes: its pictures show this model's numbers

batch_size = 64
learning_rate = 5e-3
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 50
min_lr = 5e-4
weight_decay = 0.1
beta2 = 0.99

eval_interval = 50
eval_iters = 5
log_interval = 10
