# A tiny Chinese-character model that learns data/chinese/input.txt by heart: given the first
# three characters of a line, it writes the rest of that line.
out_dir = "out/chinese"
task = "text"
data = "data/chinese"
val_fraction = 0.0  # three lines are too few to hold any out; the val loss is the train loss

block_size = 24  # the longest line; every line start is then a window start in training
n_layer = 2
n_head = 4
n_embd = 64
dropout = 0.0

batch_size = 16
learning_rate = 3e-3
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 3e-4

eval_interval = 100
eval_iters = 5
