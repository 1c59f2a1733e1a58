# A small character-level model that learns to answer: python train.py configs/chat.py, then
# python sample.py --out_dir=out/chat --chat. Any .jsonl of {"prompt", "completion"} pairs or
# {"messages": [...]} conversations works with --data=FILE.jsonl (size block_size to its longest).
# The shipped conversations are few, so the model learns them by heart: nothing is held out.
out_dir = "out/chat"
data = "data/chat/conversations.jsonl"
val_fraction = 0.0
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
batch_size = 8
learning_rate = 2e-3
max_iters = 300  # every reply of the file is learned exactly by 200 iterations (seeds 1 and 1337; 250: 1, 2, 1337)
lr_decay_iters = 300
warmup_iters = 50
min_lr = 2e-4
eval_interval = 150
eval_iters = 10
log_interval = 20
dropout = 0.0
