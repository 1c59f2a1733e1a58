# A model as small as the explainers' drawings: 6 channels, 2 heads of 3, one block. Its
# matrices fit a screen, so `python -m model.walkthrough` can show every number of a forward
# pass. 900 parameters, and still it learns data/chinese/input.txt: from the first three
# characters of a line it writes the rest (tests/test_walkthrough.py checks it).
out_dir = "out/walkthrough"
task = "text"
data = "data/chinese"
val_fraction = 0.0

block_size = 24
n_layer = 1
n_head = 2
n_embd = 6
dropout = 0.0

batch_size = 16
learning_rate = 1e-2
max_iters = 600
lr_decay_iters = 600
warmup_iters = 20
min_lr = 1e-3
weight_decay = 0.0

eval_interval = 200
eval_iters = 5
