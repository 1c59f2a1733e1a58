# configs/chinese.py with what Llama and Qwen changed since GPT-2, all at once: rotary positions,
# RMSNorm, the gated SiLU feed-forward (SwiGLU), grouped-query attention, per-head Q/K norms (Qwen3)
# and no biases. It learns data/chinese/input.txt by heart, as the GPT-2-style model does.
#   python train.py configs/modern.py && python sample.py --out_dir=out/modern --start=天行健 --temperature=0
out_dir = "out/modern"
task = "text"
data = "data/chinese"
val_fraction = 0.0  # three lines are too few to hold any out; the val loss is the train loss

block_size = 24
n_layer = 2
n_head = 4
n_embd = 64
positions = "rope"  # no position embedding: Q and K turned by position in every attention layer
rope_theta = 10000.0
normalization = "rmsnorm"
mlp = "gated"
activation = "silu"
intermediate_size = 176  # about 8/3 x n_embd, as Llama sizes its gated feed-forward
n_kv_head = 2  # two key/value heads, each shared by two query heads
qk_norm = True
bias = False
dropout = 0.0

batch_size = 16
learning_rate = 3e-3
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 3e-4

eval_interval = 100
eval_iters = 5
