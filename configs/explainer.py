# The Transformer of the step-by-step explainers, as small as their drawings: the original
# Transformer's choices (fixed sinusoidal positional encoding, "Add & Norm" after each
# sub-layer, a ReLU feed-forward), 8 channels, 2 heads of 4, one block: 1,184 parameters. It
# still learns data/chinese/input.txt: from the first characters of a line it writes the rest
# (tests/test_walkthrough.py checks it). See every number of a forward pass with
#   python -m model.walkthrough --out_dir=out/explainer --start=白日依山尽
out_dir = "out/explainer"
task = "text"
data = "data/chinese"
val_fraction = 0.0

positions = "sinusoidal"  # PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(...)
norm = "post"  # x = LayerNorm(x + sublayer(x))
activation = "relu"  # max(0, x W1 + b1) W2 + b2

block_size = 24
n_layer = 1
n_head = 2
n_embd = 8
dropout = 0.0

batch_size = 16
learning_rate = 1e-2
max_iters = 800
lr_decay_iters = 800
warmup_iters = 20
min_lr = 1e-3
weight_decay = 0.0

eval_interval = 200
eval_iters = 5
