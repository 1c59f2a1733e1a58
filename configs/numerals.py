# Integers to Chinese numerals (305 -> 三百零五, 1010 -> 一千零一十): prompt/completion pairs made by
# data/numerals/make.py. 10% of the 10,000 numbers are held out and never trained on; every one of
# them is scored by greedy exact match (heldout_acc), as the sorter's inputs are.
out_dir = "out/numerals"
data = "data/numerals/numerals.jsonl"
val_fraction = 0.1
block_size = 16  # the longest example: <|user|>9999<|end|><|assistant|>九千九百九十九<|end|>, 15 tokens
n_layer = 3
n_head = 4
n_embd = 64  # 100% held-out by 1,000 iterations for seeds 1, 2, 3, 4 and 1337 (96 channels: no surer, slower)
batch_size = 64
learning_rate = 3e-3
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 50
min_lr = 3e-4
eval_interval = 250
eval_iters = 10
log_interval = 25
weight_decay = 0.1
dropout = 0.0
